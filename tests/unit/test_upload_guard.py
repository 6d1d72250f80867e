from __future__ import annotations

import httpx
import pytest

from lmm.upload_guard import text_file_fields

pytestmark = pytest.mark.unit


def encoded(files=None, data=None) -> tuple[bytes, bytes]:
    request = httpx.Request("POST", "http://x/generate", files=files, data=data)
    boundary = request.headers["content-type"].split("boundary=")[1].encode()
    return request.read(), boundary


def test_uploaded_files_pass_and_text_in_a_file_field_is_found():
    body, boundary = encoded(files=[("images", ("a.png", b"\x89PNG...", "image/png"))],
                             data={"prompt": "images"})
    assert text_file_fields(body, boundary, frozenset({"images"})) == []
    body, boundary = encoded(files=[("other", ("a.png", b"x", "image/png"))],
                             data={"images": "http://169.254.169.254/latest", "prompt": "hi"})
    assert text_file_fields(body, boundary, frozenset({"images"})) == ["images"]
