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

import httpx
from bentoml.exceptions import BentoMLException

from lmm.errors import BadRequest, EngineFault, LMMError, Overloaded, TooManyRequests, normalize

logger = logging.getLogger(__name__)
T = TypeVar("T")
# How long a retry waits for a restarting runner to be ready again (the request's own deadline
# still applies: it cancels the wait).
READY_WAIT_S = 30.0


def _message(exc: BentoMLException) -> str:
    status = int(exc.error_code)
    return normalize(status if status < 500 else 400, str(exc).encode())["error"]["message"]


def from_runner(exc: BaseException, runner: str) -> BaseException:
    """The error the client gets for a failed call to ``runner`` ("vision" or "LLM")."""
    if isinstance(exc, LMMError) or not isinstance(exc, (BentoMLException, httpx.HTTPError,
                                                         ConnectionError)):
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


async def wait_ready(client: Any, limit_s: float = READY_WAIT_S) -> bool:
    """Poll the runner's /readyz (BentoML's remote proxies have ``is_ready``) until it is."""
    is_ready = getattr(client, "is_ready", None)
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if is_ready is None or await is_ready(1):
                return True
        except (httpx.HTTPError, ConnectionError, OSError):
            pass
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
