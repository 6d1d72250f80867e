"""The image URL guard: allow-list matching, address classes, pinned connections, redirects,
size cap and timeout. No traffic leaves the machine: an httpx.MockTransport or a server on
127.0.0.1 (reached through an injected resolver and address check) answers."""

from __future__ import annotations

import asyncio
import http.server
import ipaddress
import threading

import httpx
import pytest

from lmm.errors import BadRequest, PayloadTooLarge
from lmm.fetch import ImageFetcher, address_allowed, host_allowed

pytestmark = pytest.mark.unit

PUBLIC = ipaddress.ip_address("93.184.216.34")
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 100


def resolver(table: dict[str, list[str]], calls: list[str] | None = None):
    async def resolve(host: str, port: int):
        if calls is not None:
            calls.append(host)
        if host not in table:
            raise OSError("no such host")
        return [ipaddress.ip_address(a) for a in table[host]]
    return resolve


def fetcher(handler, table=None, allowed=("example.com",), max_bytes=1000, timeout=5.0,
            calls=None) -> ImageFetcher:
    table = table if table is not None else {"example.com": [str(PUBLIC)],
                                             "img.example.com": [str(PUBLIC)]}
    return ImageFetcher(allowed, max_bytes, timeout, resolver=resolver(table, calls),
                        transport=httpx.MockTransport(handler))


def refuse(fetch: ImageFetcher, url: str, exc: type = BadRequest, text: str = "") -> str:
    with pytest.raises(exc) as info:
        asyncio.run(fetch.fetch(url, "p"))
    assert info.value.param == "p"
    assert text.lower() in info.value.message.lower()
    return info.value.message


def never(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no request should be sent, got {request.url}")


@pytest.mark.parametrize("host, allowed, ok", [
    ("example.com", ["example.com"], True),
    ("EXAMPLE.com.", ["example.com"], True),
    ("img.cdn.example.com", ["example.com"], True),
    ("example.com", ["Img.Example.com"], False),
    ("badexample.com", ["example.com"], False),
    ("example.com.evil.test", ["example.com"], False),
    ("example.org", ["example.com", "example.org"], True),
    ("anything", [], False),
    ("anything", [""], False),
])
def test_host_allowed(host, allowed, ok):
    assert host_allowed(host, allowed) is ok


@pytest.mark.parametrize("address, ok", [
    ("93.184.216.34", True), ("8.8.8.8", True), ("2606:4700:4700::1111", True),
    ("127.0.0.1", False), ("127.8.9.10", False), ("::1", False),
    ("10.1.2.3", False), ("172.16.0.1", False), ("192.168.1.1", False), ("fd00::1", False),
    ("169.254.169.254", False), ("fe80::1", False),
    ("224.0.0.1", False), ("ff02::1", False),
    ("0.0.0.0", False), ("::", False),
    ("240.0.0.1", False), ("255.255.255.255", False),
    ("100.64.0.1", False), ("192.0.2.1", False),
    ("::ffff:127.0.0.1", False), ("::ffff:169.254.169.254", False), ("2002:7f00:1::1", False),
])
def test_address_classes(address, ok):
    assert address_allowed(ipaddress.ip_address(address)) is ok


def test_disabled_without_an_allow_list():
    fetch = ImageFetcher([], 1000, 1.0, transport=httpx.MockTransport(never))
    assert not fetch.enabled
    refuse(fetch, "https://example.com/a.png", text="disabled")


@pytest.mark.parametrize("url, text", [
    ("http://127.0.0.1/a.png", "non-public"),
    ("http://169.254.169.254/latest/meta-data/", "non-public"),
    ("http://[::1]/a.png", "non-public"),
    ("http://0.0.0.0:8080/a.png", "non-public"),
    ("http://10.0.0.5/a.png", "non-public"),
])
def test_ip_literals_in_bad_ranges_are_refused_even_when_listed(url, text):
    host = httpx.URL(url).host
    fetch = fetcher(never, allowed=[host])
    refuse(fetch, url, text=text)


def test_names_resolving_to_private_addresses_are_refused():
    table = {"example.com": ["93.184.216.34", "10.0.0.1"], "localhost": ["127.0.0.1"],
             "meta.example.com": ["169.254.169.254"]}
    fetch = fetcher(never, table=table, allowed=["example.com", "localhost"])
    refuse(fetch, "http://example.com/a.png", text="non-public")  # one bad address is enough
    refuse(fetch, "http://localhost:3000/a.png", text="non-public")
    refuse(fetch, "http://meta.example.com/a.png", text="non-public")


def test_hosts_off_the_list_are_refused_before_any_lookup():
    calls: list[str] = []
    fetch = fetcher(never, calls=calls)
    for url in ("http://evil.test/a.png", "http://example.com.evil.test/a.png",
                "http://notexample.com/a.png"):
        refuse(fetch, url, text="allow-list")
    assert calls == []


@pytest.mark.parametrize("url, text", [
    ("ftp://example.com/a.png", "http"),
    ("http://user:pw@example.com/a.png", "credentials"),
    ("http://nowhere.example.com/a.png", "does not resolve"),
])
def test_bad_urls(url, text):
    refuse(fetcher(never), url, text=text)


def test_connects_to_the_checked_address_with_the_original_host():
    seen: list[httpx.Request] = []
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, content=PNG)

    fetch = fetcher(handler, calls=calls)
    assert asyncio.run(fetch.fetch("https://img.example.com:8443/a.png?x=1", "p")) == PNG
    request = seen[0]
    assert request.url.host == str(PUBLIC) and request.url.port == 8443
    assert request.url.path == "/a.png" and request.url.query == b"x=1"
    assert request.headers["host"] == "img.example.com:8443"
    assert request.extensions["sni_hostname"] == "img.example.com"
    assert calls == ["img.example.com"]  # resolved once: no second lookup to rebind


def test_redirects_are_checked_hop_by_hop():
    def handler(request: httpx.Request) -> httpx.Response:
        target = {"/start": "https://img.example.com/next", "/next": "/final.png",
                  "/evil": "http://evil.test/a.png", "/meta": "http://169.254.169.254/x",
                  "/loop": "/loop"}.get(request.url.path)
        if target:
            return httpx.Response(302, headers={"location": target})
        return httpx.Response(200, content=PNG)

    fetch = fetcher(handler)
    assert asyncio.run(fetch.fetch("http://example.com/start")) == PNG
    refuse(fetch, "http://example.com/evil", text="allow-list")
    fetch.allowed.append("169.254.169.254")
    refuse(fetch, "http://example.com/meta", text="non-public")
    refuse(fetch, "http://example.com/loop", text="redirected more than")


def test_size_cap():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/declared":
            return httpx.Response(200, content=b"x" * 2000)  # content-length: 2000

        async def body():
            for _ in range(30):
                yield b"x" * 100

        return httpx.Response(200, content=body())  # chunked: no length up front

    fetch = fetcher(handler, max_bytes=1000)
    refuse(fetch, "http://example.com/declared", PayloadTooLarge, "1000 byte")
    refuse(fetch, "http://example.com/streamed", PayloadTooLarge, "1000 byte")


def test_http_errors_and_timeouts():
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/slow":
            await asyncio.sleep(5)
        if request.url.path == "/broken":
            raise httpx.ConnectError("refused")
        return httpx.Response(404)

    fetch = fetcher(handler, timeout=0.2)
    refuse(fetch, "http://example.com/missing.png", text="HTTP 404")
    refuse(fetch, "http://example.com/slow", text="took over")
    refuse(fetch, "http://example.com/broken", text="ConnectError")


class _Handler(http.server.BaseHTTPRequestHandler):
    hosts: list[str] = []

    def do_GET(self) -> None:  # noqa: N802
        self.hosts.append(self.headers["Host"])
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://evil.test/a.png")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(PNG)))
        self.end_headers()
        self.wfile.write(PNG)

    def log_message(self, *args) -> None:
        pass


def test_real_connection_to_a_local_server_with_the_guard_bypassed():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        fetch = ImageFetcher(["img.test"], 1000, 5.0,
                             resolver=resolver({"img.test": ["127.0.0.1"]}),
                             address_ok=lambda ip: ip == ipaddress.ip_address("127.0.0.1"))
        assert asyncio.run(fetch.fetch(f"http://img.test:{port}/a.png")) == PNG
        assert _Handler.hosts[-1] == f"img.test:{port}"
        refuse(fetch, f"http://img.test:{port}/redirect", text="allow-list")
        # the default guard refuses the very same server
        strict = ImageFetcher(["img.test"], 1000, 5.0,
                              resolver=resolver({"img.test": ["127.0.0.1"]}))
        hits = len(_Handler.hosts)
        refuse(strict, f"http://img.test:{port}/a.png", text="non-public")
        assert len(_Handler.hosts) == hits
    finally:
        server.shutdown()
        server.server_close()
