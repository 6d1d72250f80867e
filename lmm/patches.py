"""Fixes to BentoML 1.4.39 internals, installed in every service process (``install``).

**The traffic timeout's timer.** BentoML's ``TimeoutMiddleware`` (every service with a
``traffic`` timeout: ours have one) schedules ``loop.call_later(timeout, ...)`` per request and
never cancels it. The timer handle holds the request's context, and with it the request's
OpenTelemetry span (attributes, events, links) and baggage, for the whole timeout after the
request ended: 300 s by default. Under load each process then held about 5 KiB per request
served in the last five minutes (at 66 req/s, memory grew by 40-70 MiB per 10,000 requests in
each of the three services, the README's soak figures). The fixed ``__call__`` below is
BentoML's, with the timer cancelled when the request ends; what a client sees is unchanged (the
same 504 at the same time).

**One span per streamed chunk.** BentoML adds OpenTelemetry's ASGI middleware with its
defaults, which open a span for every ``send`` and ``receive`` message: a streamed answer of
1,000 tokens became 1,000 ``http send`` spans in the trace (and as many spans started and ended
in each of the API and the LLM runner, sampled or not, on the per-token path). The request's
own server span, which carries its status and timing, is kept; only the per-message spans go.

Each fix is applied only when BentoML's code has the shape it was written for; otherwise it
leaves BentoML as it is and says so once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging

logger = logging.getLogger(__name__)
_originals: dict[str, object] = {}  # what install() replaced, by name


async def _timeout_call(self, scope, receive, send) -> None:
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    handler = asyncio.ensure_future(self.app(scope, receive, _send))
    try:
        try:
            await waiter
        except asyncio.TimeoutError:
            if handler.cancel():
                from starlette.responses import JSONResponse

                body = {"error": f"Not able to process the request in {self.timeout} seconds"}
                await JSONResponse(body, status_code=504)(scope, receive, send)
        else:
            await handler
    finally:
        timer.cancel()  # what BentoML's version leaves scheduled, holding the request's context


def _without_message_spans(init):
    def __init__(self, app, *args, exclude_spans=None, **kwargs):
        init(self, app, *args, exclude_spans=exclude_spans or ["receive", "send"], **kwargs)
    __init__.lmm_fix = True
    return __init__


def _install_span_fix() -> bool:
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

    init = OpenTelemetryMiddleware.__init__
    if getattr(init, "lmm_fix", False):
        return True
    if "exclude_spans" not in inspect.signature(init).parameters:
        logger.warning("OpenTelemetry's ASGI middleware has changed; per-message spans stay")
        return False
    _originals["OpenTelemetryMiddleware.__init__"] = init
    OpenTelemetryMiddleware.__init__ = _without_message_spans(init)
    return True


def install() -> bool:
    """Install the fixes in this process (idempotent); False when BentoML's code has changed."""
    spans = _install_span_fix()
    return _install_timeout_fix() and spans


def _install_timeout_fix() -> bool:
    from bentoml._internal.server.http import traffic

    middleware = traffic.TimeoutMiddleware
    if middleware.__call__ is _timeout_call:
        return True
    if not hasattr(middleware, "_set_timer_out"):
        logger.warning("BentoML's TimeoutMiddleware has changed; its timer fix is not applied")
        return False
    _originals["TimeoutMiddleware.__call__"] = middleware.__call__
    middleware.__call__ = _timeout_call
    return True
