"""The API service's own concurrency bound (lmm.backpressure) at the ASGI level."""

from __future__ import annotations

import asyncio
import json

import pytest

from lmm.backpressure import ConcurrencyLimit

pytestmark = pytest.mark.unit


def test_requests_past_the_limit_get_429_and_probes_pass():
    release = asyncio.Event()

    async def slow(scope, receive, send):
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    limit = ConcurrencyLimit(slow, limit=2)

    async def call(path: str) -> tuple[int, dict, bytes]:
        sent: list[dict] = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "http.request", "body": b""}

        await limit({"type": "http", "path": path, "headers": []}, receive, send)
        headers = dict(sent[0].get("headers", []))
        return sent[0]["status"], headers, b"".join(m.get("body", b"") for m in sent[1:])

    async def scenario():
        held = [asyncio.create_task(call("/generate")) for _ in range(2)]
        await asyncio.sleep(0.01)
        refused = await call("/generate")
        probe = asyncio.create_task(call("/readyz"))
        await asyncio.sleep(0.01)
        release.set()
        done = await asyncio.gather(*held, probe)
        return refused, done, await call("/generate")

    refused, done, after = asyncio.run(scenario())
    status, headers, body = refused
    assert status == 429 and headers[b"retry-after"] == b"1"
    assert json.loads(body)["error"]["type"] == "rate_limit_error"
    assert [d[0] for d in done] == [200, 200, 200] and after[0] == 200


def test_a_draining_worker_answers_503_with_connection_close():
    from lmm.backpressure import Gate

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    gate = Gate()
    gate.draining = True
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    limit = ConcurrencyLimit(ok, limit=8, gate=gate)
    asyncio.run(limit({"type": "http", "path": "/generate", "headers": []}, receive, send))
    headers = dict(sent[0]["headers"])
    assert sent[0]["status"] == 503 and headers[b"connection"] == b"close"
    assert json.loads(sent[1]["body"])["error"]["code"] == "shutting_down"
    sent.clear()
    asyncio.run(limit({"type": "http", "path": "/readyz", "headers": []}, receive, send))
    assert sent[0]["status"] == 200
