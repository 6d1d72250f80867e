"""Errors of the API service, and the one shape every 4xx/5xx body takes.

Raise ``LMMError`` subclasses from request handling. ``error_response`` is the one function that
turns any exception into a status and OpenAI's body, ``{"error": {"message", "type", "param",
"code"}}``; internals are never shown. ``ErrorShape`` (ASGI middleware on the whole service)
puts the error bodies BentoML and Starlette write themselves (request validation, unknown
routes, wrong methods) into that same shape, so a client parses one shape everywhere.
"""

from __future__ import annotations

import json
import logging
import os
from http import HTTPStatus
from typing import Any

from bentoml.exceptions import BentoMLException

logger = logging.getLogger(__name__)


class LMMError(BentoMLException):
    error_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"
    code: str | None = None
    retry_after: int | None = None  # seconds, sent as Retry-After

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(LMMError):
    """The request is malformed or asks for something unsupported (400)."""


class Unsupported(BadRequest):
    code = "unsupported_parameter"


class PayloadTooLarge(LMMError):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotFoundError(LMMError):
    error_code = HTTPStatus.NOT_FOUND
    error_type = "not_found_error"


class ModelNotFound(NotFoundError):
    code = "model_not_found"


class Overloaded(LMMError):
    """A runner cannot take the request now (503, retryable)."""

    error_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "server_error"
    code = "runner_unavailable"
    retry_after = 2


class TooManyRequests(LMMError):
    """A bounded queue is full (429, retryable: the openai SDK retries it by itself)."""

    error_code = HTTPStatus.TOO_MANY_REQUESTS
    error_type = "rate_limit_error"
    code = "overloaded"
    retry_after = 1


class DeadlineExceeded(LMMError):
    error_code = HTTPStatus.GATEWAY_TIMEOUT
    error_type = "timeout_error"
    code = "timeout"


class EngineFault(LMMError):
    """The LLM engine failed this request's sequences; the message names the cause class."""

    error_code = HTTPStatus.INTERNAL_SERVER_ERROR
    error_type = "server_error"
    code = "engine_error"


# BentoMLException subclasses that declare an error_code register themselves as what BentoML's
# clients raise for that status from a remote service. Ours must not be: a runner's 429 or 504
# is parsed by lmm.faults, from a plain BentoMLException.
for _status, _cls in list(BentoMLException.error_mapping.items()):
    if issubclass(_cls, LMMError):
        del BentoMLException.error_mapping[_status]

_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None, kind: str | None = None) -> dict:
    """The one error body: OpenAI's ``{"error": {"message", "type", "param", "code"}}``."""
    if kind is None:
        kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: BaseException) -> tuple[int, dict]:
    """HTTP status and body for an exception raised while handling a request."""
    if isinstance(exc, LMMError):
        return int(exc.error_code), error_body(int(exc.error_code), exc.message, exc.param,
                                               exc.code, exc.error_type)
    if isinstance(exc, BentoMLException) and 400 <= int(exc.error_code) < 500:
        return int(exc.error_code), error_body(int(exc.error_code), str(exc))
    return 500, error_body(500, "internal error; see the server log")


def error_headers(exc: BaseException) -> dict[str, str]:
    retry_after = getattr(exc, "retry_after", None)
    return {"Retry-After": str(retry_after)} if retry_after else {}


def json_error(exc: BaseException):
    """``error_response`` as a Starlette JSONResponse (unexpected 5xx logged with the
    traceback, ours as one line)."""
    from starlette.responses import JSONResponse

    status, body = error_response(exc)
    if status >= 500 and not isinstance(exc, LMMError):
        logger.error("request failed", exc_info=exc)
    elif status >= 500 or status == 429:
        logger.warning("request failed: %s %s", status, body["error"]["message"])
    return JSONResponse(body, status_code=status, headers=error_headers(exc))


def _loc(loc: tuple) -> list[str]:
    """A pydantic error location without "body" and union member tags ("str", "list[str]")."""
    simple = {"str", "int", "float", "bool", "list", "dict", "none"}
    return [str(p) for p in loc if p != "body" and not (
        isinstance(p, str) and ("[" in p or p in simple or p[:1].isupper()))]


def validation_error(errors: list[dict]) -> BadRequest:
    """One 400 for pydantic's list of errors: up to five "field: message" parts, and the
    deepest location they share as ``param``."""
    locs = [_loc(tuple(e.get("loc", ()))) for e in errors] or [[]]
    common = os.path.commonprefix(locs)
    issues = dict.fromkeys(f"{'.'.join(loc) or 'body'}: {e.get('msg')}"
                           for loc, e in zip(locs, errors))
    return BadRequest("; ".join(list(issues)[:5]) or "invalid request",
                      ".".join(common) or "body")


def normalize(status: int, body: bytes) -> dict:
    """The one shape for an error body written elsewhere (BentoML, Starlette, plain text)."""
    try:
        data: Any = json.loads(body) if body else None
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict) \
            and "message" in data["error"]:
        return data  # already ours
    if isinstance(data, list) and len(data) == 1:
        data = data[0]  # BentoML's [{"error": ...}] for a 4xx it raised
    if isinstance(data, dict) and isinstance(data.get("detail"), list):  # pydantic's errors
        return error_response(validation_error(data["detail"]))[1]
    if isinstance(data, dict) and data.get("error") is not None:
        message = str(data["error"])
    elif isinstance(data, dict) and data.get("detail") is not None:
        message = str(data["detail"])
    elif data is None and body and status < 500:
        message = body.decode("utf-8", "replace").strip()
    else:
        message = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else ""
    if status == 500:  # an unexpected error: whatever was written, nothing of it is shown
        message = "internal error; see the server log"
    return error_body(status, message)


class ErrorShape:
    """ASGI middleware: every 4xx/5xx response body in the one shape (JSON, same status)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start: dict | None = None
        chunks: list[bytes] = []

        async def shaped_send(message):
            nonlocal start
            if message["type"] == "http.response.start":
                if message["status"] < 400:
                    start = None
                    return await send(message)
                start = message
                return None
            if start is None:
                return await send(message)
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return None
            body = json.dumps(normalize(start["status"], b"".join(chunks))).encode()
            headers = [(k, v) for k, v in start.get("headers", [])
                       if k.lower() not in (b"content-length", b"content-type")]
            headers += [(b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, shaped_send)
