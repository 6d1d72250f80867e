"""X-Request-ID: on every response (the client's own, else the trace id), and on every log line
of that request in all three services."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration
SERVICES = ("lmm-api", "lmm-vision", "lmm-llm")
PNG = (ROOT / "examples" / "red-circle-left.png").read_bytes()


def generate(url: str, headers: dict | None = None) -> httpx.Response:
    r = httpx.post(url + "/generate", headers=headers or {}, timeout=60,
                   data={"prompt": "Describe the image."},
                   files=[("images", ("i.png", PNG, "image/png"))])
    assert r.status_code == 200, r.text
    return r


def lines_with(server, rid: str) -> list[str]:
    for _ in range(50):  # the runners' access-log lines may come a moment later
        lines = [line for line in server.log.read_text(errors="replace").splitlines()
                 if f"[request_id={rid}]" in line]
        if all(any(f":{service}:" in line for line in lines) for service in SERVICES):
            break
        time.sleep(0.1)
    return lines


def test_the_clients_id_is_answered_and_logged_by_every_service(server, url):
    rid = f"req-{uuid.uuid4().hex[:12]}"
    assert generate(url, {"X-Request-ID": rid}).headers["x-request-id"] == rid
    lines = lines_with(server, rid)
    for service in SERVICES:
        assert any(f":{service}:" in line for line in lines), (service, lines)


def test_without_an_id_the_trace_id_is_used_and_an_invalid_one_is_replaced(server, url):
    rid = generate(url).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    lines = lines_with(server, rid)
    assert lines and all(f"trace={rid}" in line for line in lines), lines
    replaced = generate(url, {"X-Request-ID": "bad id\twith spaces"}).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", replaced)
    error = httpx.post(url + "/generate", json={}, headers={"X-Request-ID": "err-1"}, timeout=30)
    assert error.status_code == 400 and error.headers["x-request-id"] == "err-1"
