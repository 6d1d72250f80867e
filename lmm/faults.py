"""Runner calls as the API sees them fail: every failure of a call to the vision or LLM runner
becomes an error of ours with the right status, and a call that failed because its runner is
gone or restarting is tried once more after the runner is back.

- the runner is unreachable, its worker died mid-call, or it answered 502/503/504: 503
  ``runner_unavailable`` with Retry-After, naming the runner;
- it answered 429 (a bounded queue is full; BentoML's ``max_concurrency``): 429 with Retry-After;
- it refused the request (4xx): 400 with the runner's message;
- anything else it answered (5xx): 500 ``engine_error`` with the runner's message.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp
import httpx
from bentoml.exceptions import BentoMLException

from lmm.errors import BadRequest, EngineFault, LMMError, Overloaded, TooManyRequests, normalize

logger = logging.getLogger(__name__)
T = TypeVar("T")
# A connection to a runner failed or broke mid-call (BentoML's runner clients use aiohttp;
# httpx where a client is built by hand).
TRANSPORT = (aiohttp.ClientError, httpx.HTTPError, ConnectionError, asyncio.IncompleteReadError)
# How long a retry waits for a restarting runner to be ready again (the request's own deadline
# still applies: it cancels the wait).
READY_WAIT_S = 30.0


def _message(exc: BentoMLException) -> str:
    status = int(exc.error_code)
    return normalize(status if status < 500 else 400, str(exc).encode())["error"]["message"]


def from_runner(exc: BaseException, runner: str) -> BaseException:
    """The error the client gets for a failed call to ``runner`` ("vision" or "LLM")."""
    if isinstance(exc, LMMError) or not isinstance(exc, TRANSPORT + (BentoMLException,)):
        return exc
    if not isinstance(exc, BentoMLException):
        return Overloaded(f"the {runner} runner is unavailable (restarting or unreachable: "
                          f"{type(exc).__name__}); retry shortly.")
    status = int(exc.error_code)
    if status == 429:
        return TooManyRequests(f"the {runner} runner is at capacity; retry shortly.")
    if status in (502, 503, 504):
        return Overloaded(f"the {runner} runner is unavailable ({_message(exc)}); retry shortly.")
    if 400 <= status < 500:
        return BadRequest(_message(exc))
    return EngineFault(f"the {runner} runner failed: {_message(exc)}")


async def ready(client: Any, timeout_s: float = 1.0) -> bool:
    """Whether the runner answers its /readyz with 200 within ``timeout_s`` (BentoML's remote
    proxies have ``is_ready``; a restarting runner can leave the call hanging, hence the bound).
    A client without ``is_ready`` (an in-process runner) is always ready."""
    is_ready = getattr(client, "is_ready", None)
    if is_ready is None:
        return True
    try:
        async with asyncio.timeout(timeout_s):
            return bool(await is_ready(max(1, int(timeout_s))))
    except (TimeoutError, OSError) + TRANSPORT:
        return False


async def wait_ready(client: Any, limit_s: float = READY_WAIT_S) -> bool:
    """Poll the runner's /readyz until it is ready (at most ``limit_s``)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if await ready(client):
            return True
        await asyncio.sleep(0.25)
    return False


async def call(runner: str, client: Any, make: Callable[[], Awaitable[T]]) -> T:
    """``await make()``, tried once more after the runner is back if it was unavailable."""
    try:
        return await make()
    except Exception as exc:
        fault = from_runner(exc, runner)
        if not isinstance(fault, Overloaded) or not await wait_ready(client):
            raise fault from None
        logger.warning("retrying a call to the %s runner once: %s", runner, fault.message)
    try:
        return await make()
    except Exception as exc:
        raise from_runner(exc, runner) from None


class RunnerStream:
    """A runner's stream, closed with its HTTP response.

    BentoML's streaming client (``_get_stream`` over ``_parse_stream_response``) never closes the
    aiohttp response of a stream left early, nor of one cancelled (a deadline, a client gone):
    the response stays open until garbage collection gets to it, and until then the LLM runner
    does not see the disconnect that aborts the sequence. So the response is taken from the
    generators' frames once the stream has started (when they are what is expected) and closed
    here.
    """

    def __init__(self, stream: Any):
        self.stream = stream
        self.response = None

    def started(self) -> None:
        self.response = _local(_local(self.stream, "resp"), "resp")

    async def aclose(self) -> None:
        try:
            if hasattr(self.stream, "aclose"):
                await self.stream.aclose()
        finally:
            if self.response is not None and callable(getattr(self.response, "close", None)):
                self.response.close()


def _local(generator: Any, name: str) -> Any:
    frame = getattr(generator, "ag_frame", None)
    return frame.f_locals.get(name) if frame is not None else None
