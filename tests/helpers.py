"""Assertions shared by unit and integration tests."""

from __future__ import annotations

import re


def assert_error(response, status: int, param: str | None = None, text: str = "") -> dict:
    """The response is ``status`` with the one error body, naming ``param`` and containing
    ``text`` (a regular expression, case-insensitive) in its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["type"] == ("server_error" if status >= 500 else error["type"])
    if param is not None:
        assert error["param"] == param, error
    assert re.search(text, error["message"], re.I), error
    return error
