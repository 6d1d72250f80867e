"""Graceful shutdown: SIGTERM (what Kubernetes and `docker stop` send) lets the streams in flight
finish, and what arrives afterwards is refused (503 or a refused connection) at once, not left
waiting and not failed with a 500.

The server is one of its own (configs/test.yaml, transformers): the test stops it.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time

import httpx
import psutil
import pytest

from tests.conftest import serve

pytestmark = pytest.mark.integration

STREAMS = 16
MAX_TOKENS = 200
STREAM_TIMEOUT = 120.0  # seconds for all streams to end, SIGTERM included
REFUSAL_TIMEOUT = 5.0  # seconds a request sent after SIGTERM may take to be refused
EXIT_TIMEOUT = 60.0  # seconds for the server to exit once its streams are done

BODY = {
    "model": "shapes-llava", "stream": True, "max_tokens": MAX_TOKENS, "ignore_eos": True,
    "temperature": 0, "messages": [{"role": "user", "content": "Describe a red circle."}],
}


@pytest.fixture
def stopping(bentoml_home, tmp_path):
    server = serve(bentoml_home, tmp_path)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()  # whatever SIGTERM left running


class Stream:
    def __init__(self):
        self.status: int | None = None
        self.events: list[str] = []
        self.error: BaseException | None = None
        self.first = asyncio.Event()

    def finish_reasons(self) -> list[str]:
        reasons = []
        for event in self.events[:-1]:
            for choice in json.loads(event).get("choices", []):
                if choice.get("finish_reason"):
                    reasons.append(choice["finish_reason"])
        return reasons

    def error_events(self) -> list[str]:
        return [e for e in self.events[:-1] if "error" in json.loads(e)]


async def _stream(client: httpx.AsyncClient, url: str, out: Stream) -> None:
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=BODY) as r:
            out.status = r.status_code
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    out.events.append(line[6:])
                    out.first.set()
    except Exception as exc:  # noqa: BLE001 - reported by the assertions
        out.error = exc
    finally:
        out.first.set()


async def _late_request(url: str) -> tuple[str, float]:
    """A new request (a new connection) sent after SIGTERM: how it ended, and when."""
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=httpx.Timeout(REFUSAL_TIMEOUT, connect=REFUSAL_TIMEOUT)) as c:
            r = await c.post(url + "/v1/chat/completions", json={**BODY, "stream": False,
                                                                 "max_tokens": 4})
        outcome = f"HTTP {r.status_code}: {r.text[:300]}"
    except httpx.ConnectError:
        outcome = "refused"
    except httpx.TimeoutException as exc:
        outcome = f"no answer within {REFUSAL_TIMEOUT:.0f} s ({type(exc).__name__}): a hang"
    except httpx.TransportError as exc:
        outcome = f"connection accepted, then dropped unanswered ({exc!r})"
    return outcome, time.monotonic() - started


async def _shutdown_under_streams(server) -> tuple[list[Stream], list[int], tuple[str, float]]:
    streams = [Stream() for _ in range(STREAMS)]
    limits = httpx.Limits(max_connections=STREAMS)
    timeout = httpx.Timeout(STREAM_TIMEOUT, connect=10)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks = [asyncio.create_task(_stream(client, server.url, s)) for s in streams]
        await asyncio.wait_for(asyncio.gather(*(s.first.wait() for s in streams)), 60)
        at_sigterm = [len(s.events) for s in streams]
        os.killpg(server.proc.pid, signal.SIGTERM)  # as Server.stop(): the arbiter's group
        await asyncio.sleep(0.5)  # the signal has reached the server
        late = await _late_request(server.url)
        await asyncio.wait_for(asyncio.gather(*tasks), STREAM_TIMEOUT)
    return streams, at_sigterm, late


def test_sigterm_lets_streams_finish_and_refuses_new_requests(stopping):
    workers = psutil.Process(stopping.proc.pid).children(recursive=True)
    streams, at_sigterm, (late, late_s) = asyncio.run(_shutdown_under_streams(stopping))

    for i, s in enumerate(streams):
        assert s.error is None, f"stream {i} broke: {s.error!r} after {len(s.events)} events"
        assert s.status == 200, (i, s.status, s.events[:2])
        assert s.events and s.events[-1] == "[DONE]", (i, s.events[-3:])
        assert not s.error_events(), (i, s.error_events())
        assert s.finish_reasons() == ["length"], (i, s.finish_reasons())
    # The streams were still running when SIGTERM came, and went on after it.
    assert sum(len(s.events) for s in streams) > sum(at_sigterm), at_sigterm

    assert late == "refused" or late.startswith("HTTP 503"), (
        f"a request sent after SIGTERM: {late} (after {late_s:.1f} s)")
    assert late_s < REFUSAL_TIMEOUT, (late, late_s)

    # Then the server exits, and every worker with it.
    try:
        stopping.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {EXIT_TIMEOUT:.0f} s of its streams ending")
    _, alive = psutil.wait_procs(workers, timeout=EXIT_TIMEOUT)
    assert not alive, [p.pid for p in alive]
