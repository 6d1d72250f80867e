"""Request ids: every response carries ``X-Request-ID`` (the client's own when it sends a valid
one, else the request's trace id), and every log line written for that request, in all three
services, ends with ``[request_id=...]``.

The id travels to the runners as OpenTelemetry baggage, which BentoML's runner clients send
with the trace context on every call; a log-record factory, installed in each service process,
appends it to the lines logged while a request is being handled.
"""

from __future__ import annotations

import logging
import re
import uuid

from opentelemetry import baggage, context, trace

KEY = "request_id"
_VALID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")  # safe in logs and headers


def current() -> str | None:
    value = baggage.get_baggage(KEY)
    return str(value) if value else None


def _new_id() -> str:
    span = trace.get_current_span().get_span_context()
    return format(span.trace_id, "032x") if span.is_valid else uuid.uuid4().hex


class RequestId:
    """ASGI middleware: choose the id, put it in the context (baggage) and on the response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given.strip() if _VALID.match(given.strip()) else _new_id()

        async def with_id(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"x-request-id"]
                message = {**message, "headers": headers + [(b"x-request-id", rid.encode())]}
            await send(message)

        token = context.attach(baggage.set_baggage(KEY, rid))
        try:
            await self.app(scope, receive, with_id)
        finally:
            context.detach(token)


def install_log_records() -> None:
    """Make every log record created while a request is handled end with its id (once per
    process; later calls do nothing)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "_lmm_request_id", False):
        return

    def factory(*args, **kwargs):
        record = previous(*args, **kwargs)
        rid = current()
        if rid and isinstance(record.msg, str):
            record.msg = f"{record.msg} [request_id={rid}]"
        return record

    factory._lmm_request_id = True
    logging.setLogRecordFactory(factory)
