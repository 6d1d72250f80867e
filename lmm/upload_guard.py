"""Refuse text values in multipart file fields of the native API; drop empty ones.

BentoML downloads any text sent in a file field as a URL, before the handler runs: that would
bypass ``images.allowed_url_domains`` and the size caps. Images are uploads or ``images_b64``.
An empty text part in a file field is what a browser form sends for a file input left empty
(Swagger UI's "Send empty value"): it means "no file" and is removed from the body.
"""

from __future__ import annotations

import json
import re

from lmm.errors import error_body

_BOUNDARY = re.compile(rb'boundary="?([^";]+)"?', re.I)


def _field(headers: bytes) -> tuple[str | None, bool]:
    """(name, has a filename) of one part's headers."""
    disposition = re.search(rb"content-disposition:[^\r\n]*", headers, re.I)
    if not disposition:
        return None, False
    name = re.search(rb'\bname="([^"]*)"', disposition.group(0))
    return (name.group(1).decode() if name else None), b"filename=" in disposition.group(0)


def split_text_file_fields(body: bytes, boundary: bytes,
                           fields: frozenset[str]) -> tuple[bytes, list[str]]:
    """(``body`` without empty text parts of ``fields``, names of ``fields`` parts holding text)."""
    delimiter = b"--" + boundary
    pieces = body.split(delimiter)
    kept, bad = [pieces[0]], []
    for piece in pieces[1:]:
        headers, separator, content = piece.partition(b"\r\n\r\n")
        name, is_file = _field(headers)
        if separator and name in fields and not is_file:
            if content in (b"", b"\r\n"):  # nothing between the headers and the next delimiter
                continue
            bad.append(name)
        kept.append(piece)
    return delimiter.join(kept), bad


def malformed(body: bytes, boundary: bytes) -> str | None:
    """Why ``body`` is not a multipart body BentoML's parser can read, or None.

    The parser's own error surfaces as a 500 from BentoML's endpoint wrapper, so the shapes it
    refuses are refused here, as a 400: no closing delimiter, or a part without headers and a
    named Content-Disposition."""
    delimiter = b"--" + boundary
    if delimiter + b"--" not in body:
        return f"no closing boundary --{boundary.decode('latin-1')}--"
    parts = body.split(delimiter + b"--")[0].split(delimiter)[1:]
    if not parts:
        return "no parts"
    for i, part in enumerate(parts):
        headers, separator, _ = part.partition(b"\r\n\r\n")
        if not separator or not part.startswith(b"\r\n") or _field(headers)[0] is None:
            return f"part {i + 1} has no Content-Disposition with a name"
    return None


def text_file_fields(body: bytes, boundary: bytes, fields: frozenset[str]) -> list[str]:
    """Names of ``fields`` parts sent as non-empty text (not a file)."""
    return split_text_file_fields(body, boundary, fields)[1]


class UploadGuard:
    """ASGI middleware: 400 for multipart requests that put text into a file field."""

    def __init__(self, app, fields: tuple[str, ...] = ("images",), max_body: int = 64 << 20):
        self.app, self.fields, self.max_body = app, frozenset(fields), max_body

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or []) if scope["type"] == "http" else {}
        kind = headers.get(b"content-type", b"")
        boundary = _BOUNDARY.search(kind) if kind.lower().startswith(b"multipart/") else None
        if boundary is None:
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message], receive), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.max_body:
                return await _reject(send, 413, f"request body over {self.max_body} bytes")
        body = b"".join(chunks)
        problem = malformed(body, boundary.group(1))
        if problem:
            return await _reject(send, 400, f"malformed multipart body: {problem}; send "
                                 "multipart/form-data as a browser or HTTP library writes it")
        body, bad = split_text_file_fields(body, boundary.group(1), self.fields)
        if bad:
            return await _reject(send, 400, f"field {bad[0]!r} takes uploaded files; send images "
                                 f"as files, or as base64 / data URLs in '{bad[0]}_b64'", bad[0])
        await self.app(scope, _replay([{"type": "http.request", "body": body}], receive), send)


def _replay(messages, receive):
    """Hand the buffered body over again, then the real channel (a streaming response waits
    on it for the client's disconnect: a fake one would end the stream at once)."""

    async def replayed():
        return messages.pop(0) if messages else await receive()

    return replayed


async def _reject(send, status: int, message: str, param: str | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
