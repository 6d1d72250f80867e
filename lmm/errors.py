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
