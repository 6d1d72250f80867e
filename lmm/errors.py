"""Client faults, mapped to HTTP status in one place.

Raise these from request handling; BentoML turns a ``BentoMLException`` into its ``error_code``,
and any other exception into a bare 500 with no internals.
"""

from __future__ import annotations

from http import HTTPStatus

from bentoml.exceptions import BentoMLException


class LMMError(BentoMLException):
    error_code = HTTPStatus.BAD_REQUEST
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param


class BadRequest(LMMError):
    """The request is malformed or asks for something unsupported (400)."""


class PayloadTooLarge(LMMError):
    error_code = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class NotFoundError(LMMError):
    error_code = HTTPStatus.NOT_FOUND
    error_type = "not_found_error"


class Overloaded(LMMError):
    error_code = HTTPStatus.SERVICE_UNAVAILABLE
    error_type = "server_error"


def error_response(exc: BaseException) -> tuple[int, dict]:
    """HTTP status and OpenAI-shaped body for an exception; internals are never shown."""
    if isinstance(exc, LMMError):
        status, message, kind = int(exc.error_code), exc.message, exc.error_type
        param, code = exc.param, getattr(exc, "code", None)
    elif isinstance(exc, BentoMLException) and 400 <= int(exc.error_code) < 500:
        status, message, kind, param, code = (
            int(exc.error_code), str(exc), "invalid_request_error", None, None)
    else:
        status, message, kind, param, code = (
            500, "internal error; see the server log", "server_error", None, None)
    return status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
