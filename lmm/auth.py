"""API keys: ``Authorization: Bearer <key>`` on every route but the health probes.

Keys come from ``LMM_API_KEY`` (the Kubernetes manifests fill it from a Secret) and from
``auth.api_keys_file`` (one key per line, ``#`` comments; re-read when the file changes, so a
key is rotated by adding the new one, moving clients over, then removing the old one). With no
key configured every route is open and the service says so once at startup. A key is compared
in constant time against each configured key and is never logged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
from pathlib import Path

from lmm.errors import error_body

logger = logging.getLogger(__name__)
ENV = "LMM_API_KEY"
# Probes answer without a key; so do the Swagger UI page and its assets, which carry no data
# (the UI's "Authorize" button sends the key with every request it makes).
OPEN = frozenset({"/livez", "/readyz", "/healthz", "/", "/docs.json"})
OPEN_PREFIXES = ("/static_content/",)


class KeyStore:
    """The configured keys, as SHA-256 digests (re-read when the keys file changes)."""

    def __init__(self, env_key: str | None = None, keys_file: str | None = None):
        self.env_key = (env_key or "").strip()
        self.keys_file = Path(keys_file) if keys_file else None
        self._stamp: tuple[float, int] | None = None
        self._file_digests: list[bytes] = []
        if self.keys_file is not None:
            self.digests()  # a missing or unreadable file fails at startup, not per request

    @classmethod
    def from_environment(cls, keys_file: str | None) -> KeyStore:
        return cls(os.environ.get(ENV), keys_file)

    def digests(self) -> list[bytes]:
        found = [_digest(self.env_key)] if self.env_key else []
        if self.keys_file is not None:
            stat = self.keys_file.stat()
            if self._stamp != (stat.st_mtime, stat.st_size):
                lines = self.keys_file.read_text().splitlines()
                keys = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
                self._file_digests = [_digest(k) for k in keys]
                self._stamp = (stat.st_mtime, stat.st_size)
            found += self._file_digests
        return found

    @property
    def enabled(self) -> bool:
        return bool(self.digests())

    def accepts(self, key: str) -> bool:
        given = _digest(key)
        ok = False
        for digest in self.digests():  # no early exit: the time does not tell which key matched
            ok |= hmac.compare_digest(given, digest)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def bearer(headers: dict[bytes, bytes]) -> str | None:
    value = headers.get(b"authorization", b"").decode("latin-1").strip()
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class ApiKeyAuth:
    """ASGI middleware: 401 in the one error shape unless the request carries a valid key."""

    def __init__(self, app, keys: KeyStore, protect_metrics: bool = True):
        self.app, self.keys, self.protect_metrics = app, keys, protect_metrics
        if not keys.enabled:
            logger.warning("no API key configured (%s or auth.api_keys_file): every route "
                           "answers without one", ENV)

    def _open(self, path: str) -> bool:
        if path in OPEN or path.startswith(OPEN_PREFIXES):
            return True
        return path == "/metrics" and not self.protect_metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self._open(scope.get("path", "")) or not self.keys.enabled:
            return await self.app(scope, receive, send)
        key = bearer(dict(scope.get("headers") or []))
        if key is not None and self.keys.accepts(key):
            return await self.app(scope, receive, send)
        message = ("missing API key: send the header 'Authorization: Bearer <key>'" if key is None
                   else "invalid API key")
        body = json.dumps(error_body(401, message, code="invalid_api_key")).encode()
        await send({"type": "http.response.start", "status": 401, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
