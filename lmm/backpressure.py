"""A bound on the requests the API service works on at once (``api.max_concurrency``), and
draining on SIGTERM.

Past it a request gets 429 with Retry-After in the one error shape at once, rather than
queueing; the openai SDK retries 429 by itself. (BentoML's own ``max_concurrency`` answers with
a bare ``{"error": "Too many requests"}`` and no Retry-After, so the API service does not use it;
the runners do, and the API turns their 429 into this same answer.) Health probes, the docs and
/metrics are not counted.

On SIGTERM (Kubernetes, ``docker stop``) the worker keeps serving what is in flight, for up to
``api.shutdown_grace_s``, while it answers every new request at once with 503 (Retry-After,
``Connection: close``: a load balancer moves on to another replica); then it stops as BentoML
would have at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal

from lmm.errors import Overloaded, TooManyRequests, json_error

logger = logging.getLogger(__name__)
EXEMPT = frozenset({"/livez", "/readyz", "/healthz", "/metrics", "/", "/docs.json"})


class Gate:
    """This worker's requests in flight, and whether it is shutting down."""

    def __init__(self):
        self.in_flight = 0
        self.draining = False


GATE = Gate()


class ShuttingDown(Overloaded):
    code = "shutting_down"
    retry_after = 1


class ConcurrencyLimit:
    def __init__(self, app, limit: int, gate: Gate = GATE):
        self.app, self.limit, self.gate = app, limit, gate

    @property
    def in_flight(self) -> int:
        return self.gate.in_flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "") in EXEMPT:
            return await self.app(scope, receive, send)
        if self.gate.draining:
            response = json_error(ShuttingDown("the server is shutting down; retry (another "
                                               "replica will answer)."))
            response.headers["Connection"] = "close"
            return await response(scope, receive, send)
        if self.in_flight >= self.limit:
            refused = TooManyRequests(f"the server is at its limit of {self.limit} requests in "
                                      "flight (api.max_concurrency); retry shortly.")
            return await json_error(refused)(scope, receive, send)
        self.gate.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.gate.in_flight -= 1


def drain_on_sigterm(grace_s: float, gate: Gate = GATE) -> None:
    """Turn SIGTERM/SIGINT into: drain (503 to new requests), wait for what is in flight (at
    most ``grace_s``), then the server's own stop. A second signal stops at once. Call from the
    worker's event loop once the server has installed its handlers (a startup hook)."""
    loop = asyncio.get_running_loop()

    def stop(signum: int, previous) -> None:
        if callable(previous):
            previous(signum, None)
        else:  # SIG_DFL / SIG_IGN: put it back and send the signal again
            signal.signal(signum, previous)
            os.kill(os.getpid(), signum)

    async def finish(signum: int, previous) -> None:
        deadline = loop.time() + grace_s
        while gate.in_flight and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if gate.in_flight:
            logger.warning("shutdown grace of %g s over: %d requests still in flight", grace_s,
                           gate.in_flight)
        stop(signum, previous)
        # uvicorn then waits for every connection to close, idle keep-alive ones included, which
        # a client may hold open for as long as it likes: nothing is in flight any more, so a
        # second signal (uvicorn's "force exit") ends the wait.
        await asyncio.sleep(2.0)
        if callable(previous):
            previous(signal.SIGINT, None)

    for signum in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(signum)

        def handler(sig, frame, previous=previous):
            if gate.draining:
                return stop(sig, previous)
            gate.draining = True
            logger.warning("shutting down: %d requests in flight finish (at most %g s), new "
                           "ones get 503", gate.in_flight, grace_s)
            loop.call_soon_threadsafe(lambda: loop.create_task(finish(sig, previous)))

        signal.signal(signum, handler)
