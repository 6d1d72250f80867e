"""Fetching image URLs without opening an SSRF hole.

Only http(s) URLs whose host is on the allow-list (exactly or as a subdomain) are fetched. The
host is resolved here and every address must be public (no loopback, private, link-local,
multicast, reserved or unspecified ones, IPv4-mapped forms included); the request then goes to
that checked address (Host header and TLS SNI keep the name), so a second DNS answer cannot
redirect it. Redirects are followed by hand, each hop checked the same way; the body is capped
at ``max_bytes`` and the whole fetch at ``timeout_s``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from typing import Awaitable, Callable, Iterable

import httpx

from lmm.errors import BadRequest, PayloadTooLarge

logger = logging.getLogger(__name__)

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[IPAddress]]]
MAX_REDIRECTS = 5


def host_allowed(host: str, allowed: Iterable[str]) -> bool:
    """Whether ``host`` is one of ``allowed`` or a subdomain of one (case-insensitive)."""
    host = host.lower().rstrip(".")
    for domain in allowed:
        domain = domain.lower().strip().rstrip(".")
        if domain and (host == domain or host.endswith("." + domain)):
            return True
    return False


def address_allowed(ip: IPAddress) -> bool:
    """Whether a connection to ``ip`` is acceptable: a public unicast address only."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour or (ip.teredo[1] if ip.teredo else None)
        if embedded is not None and not address_allowed(embedded):
            return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast
        or ip.is_reserved or ip.is_unspecified
    )


async def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (system resolver)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class ImageFetcher:
    """Fetches image bytes from allow-listed http(s) URLs; every refusal is a 400."""

    def __init__(self, allowed_domains: Iterable[str], max_bytes: int, timeout_s: float, *,
                 resolver: Resolver = resolve,
                 address_ok: Callable[[IPAddress], bool] = address_allowed,
                 transport: httpx.AsyncBaseTransport | None = None,
                 max_redirects: int = MAX_REDIRECTS):
        self.allowed = [d for d in allowed_domains if d.strip()]
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.resolver = resolver
        self.address_ok = address_ok
        self.transport = transport
        self.max_redirects = max_redirects

    @property
    def enabled(self) -> bool:
        return bool(self.allowed)

    async def fetch(self, url: str, param: str | None = None) -> bytes:
        """The body of ``url`` after every check; BadRequest/PayloadTooLarge otherwise."""
        if not self.enabled:
            raise BadRequest(
                "image URLs are disabled on this server; send the image inline as a "
                "data:image/...;base64,... URL.", param)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(url, param)
        except TimeoutError:
            raise BadRequest(f"fetching the image URL took over {self.timeout_s:g}s.", param)
        except httpx.HTTPError as exc:
            logger.info("image fetch failed: %r", exc)
            raise BadRequest(f"could not fetch the image URL ({type(exc).__name__}).", param)

    async def check(self, url: str, param: str | None = None) -> tuple[httpx.URL, IPAddress]:
        """The parsed URL and the checked address to connect to."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError, ValueError):
            raise BadRequest("image URL is not a valid URL.", param) from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadRequest("image URLs must be data:, http: or https: URLs.", param)
        if parsed.userinfo:
            raise BadRequest("image URLs with credentials are not accepted.", param)
        host = parsed.host
        if not host_allowed(host, self.allowed):
            raise BadRequest(f"image URL host {host!r} is not on this server's allow-list "
                             "(images.allowed_url_domains).", param)
        try:
            addresses: list[IPAddress] = [ipaddress.ip_address(host)]
        except ValueError:
            port = parsed.port or (443 if parsed.scheme == "https" else 80)
            try:
                addresses = await self.resolver(host, port)
            except OSError:
                raise BadRequest(f"image URL host {host!r} does not resolve.", param) from None
        if not addresses:
            raise BadRequest(f"image URL host {host!r} does not resolve.", param)
        for ip in addresses:
            if not self.address_ok(ip):
                raise BadRequest(f"image URL host {host!r} is a non-public address ({ip}); "
                                 "refused.", param)
        return parsed, addresses[0]

    async def _fetch(self, url: str, param: str | None) -> bytes:
        async with httpx.AsyncClient(transport=self.transport, follow_redirects=False,
                                     timeout=self.timeout_s, trust_env=False) as client:
            for _ in range(self.max_redirects + 1):
                parsed, ip = await self.check(url, param)
                extensions = {"sni_hostname": parsed.host} if parsed.scheme == "https" else {}
                request = client.build_request(
                    "GET", parsed.copy_with(host=str(ip)), extensions=extensions,
                    headers={"Host": parsed.netloc.decode("ascii"), "Accept": "image/*"},
                )
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect and "location" in response.headers:
                        url = str(parsed.join(response.headers["location"]))
                        continue
                    if response.status_code != 200:
                        raise BadRequest(
                            f"image URL answered HTTP {response.status_code}.", param)
                    return await self._read(response, param)
                finally:
                    await response.aclose()
        raise BadRequest(f"image URL redirected more than {self.max_redirects} times.", param)

    async def _read(self, response: httpx.Response, param: str | None) -> bytes:
        too_large = f"image is larger than the {self.max_bytes} byte limit."
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise PayloadTooLarge(too_large, param)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk
            if len(body) > self.max_bytes:
                raise PayloadTooLarge(too_large, param)
        return bytes(body)
