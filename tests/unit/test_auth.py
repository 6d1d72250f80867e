"""lmm.auth on its own: which keys are accepted, rotation through the keys file, open paths."""

from __future__ import annotations

import asyncio
import json
import os

import pytest

from lmm.auth import ApiKeyAuth, KeyStore

pytestmark = pytest.mark.unit


def test_env_key_and_file_keys(tmp_path):
    keys = tmp_path / "keys"
    keys.write_text("# comment\n  one  \n\ntwo\n")
    store = KeyStore("env", str(keys))
    assert [store.accepts(k) for k in ("env", "one", "two", "# comment", "", "three")] == [
        True, True, True, False, False, False]
    keys.write_text("three\n")
    os.utime(keys, (1, 1))  # a new stamp even within the file system's time resolution
    assert store.accepts("three") and not store.accepts("one") and store.accepts("env")


def test_no_key_means_open_and_a_missing_file_fails_at_startup(tmp_path):
    assert not KeyStore(None, None).enabled
    with pytest.raises(FileNotFoundError):
        KeyStore(None, str(tmp_path / "absent"))


def run(app, path: str, headers: list[tuple[bytes, bytes]] = ()) -> tuple[int, dict | None]:
    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    scope = {"type": "http", "path": path, "headers": list(headers)}
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else None


async def ok_app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.parametrize("path, headers, status", [
    ("/generate", [], 401),
    ("/generate", [(b"authorization", b"Bearer k")], 200),
    ("/generate", [(b"authorization", b"bearer   k ")], 200),
    ("/generate", [(b"authorization", b"Basic k")], 401),
    ("/generate", [(b"authorization", b"Bearer kk")], 401),
    ("/v1/models", [], 401),
    ("/metrics", [], 401),
    ("/readyz", [], 200), ("/livez", [], 200), ("/healthz", [], 200), ("/docs.json", [], 200),
])
def test_paths(path, headers, status):
    got, body = run(ApiKeyAuth(ok_app, KeyStore("k")), path, headers)
    assert got == status
    if status == 401:
        assert body["error"]["type"] == "authentication_error"


def test_metrics_can_be_left_open():
    assert run(ApiKeyAuth(ok_app, KeyStore("k"), protect_metrics=False), "/metrics")[0] == 200
