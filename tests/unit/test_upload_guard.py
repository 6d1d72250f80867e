from __future__ import annotations

import httpx
import pytest

from lmm.upload_guard import malformed, split_text_file_fields, text_file_fields

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


FIELDS = frozenset({"images", "query_image"})


def test_a_browser_forms_empty_file_part_is_dropped_and_the_rest_still_parses():
    """What Chromium sends from Swagger UI with "Send empty value" ticked and no file picked."""
    import email.parser

    b = b"----WebKitFormBoundaryX"
    body = (b"--" + b + b'\r\nContent-Disposition: form-data; name="prompt"; filename="blob"\r\n'
            b"Content-Type: application/json\r\n\r\nDescribe the image.\r\n"
            b"--" + b + b'\r\nContent-Disposition: form-data; name="images"\r\n\r\n\r\n'
            b"--" + b + b'\r\nContent-Disposition: form-data; name="seed"; filename="blob"\r\n'
            b"Content-Type: application/json\r\n\r\n\r\n--" + b + b"--\r\n")
    out, bad = split_text_file_fields(body, b, FIELDS)
    assert bad == [] and b'name="images"' not in out and b'name="seed"' in out
    message = email.parser.BytesParser().parsebytes(
        b"Content-Type: multipart/form-data; boundary=" + b + b"\r\n\r\n" + out)
    names = [p.get_param("name", header="content-disposition") for p in message.get_payload()]
    assert names == ["prompt", "seed"]


def test_an_empty_upload_stays_and_whitespace_text_is_still_refused():
    body, boundary = encoded(files=[("images", ("a.png", b"", "image/png"))], data={"images": " "})
    out, bad = split_text_file_fields(body, boundary, FIELDS)
    assert bad == ["images"] and b'filename="a.png"' in out


@pytest.mark.parametrize("body, why", [
    (b"--B\r\n[]--B--\r\n", "Content-Disposition"),
    (b"--B\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\nx\r\n", "closing boundary"),
    (b"--B--\r\n", "no parts"),
])
def test_malformed_bodies_are_named(body, why):
    assert why in malformed(body, b"B")


def test_well_formed_bodies_pass():
    body, boundary = encoded(files=[("images", ("a.png", b"\x89PNG", "image/png"))],
                             data={"prompt": "hi", "seed": ""})
    assert malformed(body, boundary) is None
