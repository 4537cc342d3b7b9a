"""Image URLs for the API: `data:` URIs always; http(s) only for allowed hosts, fetched behind an SSRF guard.

The guard (CVE-2025-6242 is what happens without one): the URL's host must be named in `--allowed-media-domains`
(exactly, or by a `*.example.com` entry); the host is resolved here and every address it resolves to must be a
public one (no private, loopback, link-local, multicast, reserved, shared or unspecified address, IPv4-mapped IPv6
included); the connection then goes to that checked address (the Host header and TLS name stay the host's), so a
second DNS answer cannot swap in an internal address. Redirects are followed by hand, at most `max_redirects`,
and every hop is checked the same way. The body is capped in bytes (checked from Content-Length first, then while
reading) and the whole fetch in seconds. Environment proxies are not used: a proxy would make the address check moot.

Not here: decoding the bytes (vision.intake does that, with its own caps), file paths or `file:` URLs (refused).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import urllib.parse
from typing import Awaitable, Callable

import httpx

from engine.chat.messages import decode_data_uri, is_data_uri

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]


class MediaError(ValueError):
    """An image URL that was refused (`code` "image_url_not_allowed") or could not be fetched
    ("image_fetch_failed"). The message is for the API client."""

    def __init__(self, message: str, code: str = "image_url_not_allowed"):
        super().__init__(message)
        self.code = code


def is_public(address: Address) -> bool:
    """Only globally routable unicast addresses: what an image host on the internet has."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_global and not address.is_multicast


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


class MediaFetcher:
    def __init__(self, allowed_domains: list[str] | tuple[str, ...] = (), max_bytes: int = 20 * 2**20,
                 timeout_s: float = 10.0, max_redirects: int = 3, resolver: Resolver = resolve,
                 address_allowed: Callable[[Address], bool] = is_public):
        self.allowed = tuple(d.strip().lower().rstrip(".") for d in allowed_domains if d.strip())
        self.max_bytes, self.timeout_s, self.max_redirects = max_bytes, timeout_s, max_redirects
        self.resolver, self.address_allowed = resolver, address_allowed

    async def load(self, source: str, name: str) -> bytes:
        """The bytes of a data: URI or an allowed http(s) URL; MediaError (or intake's ImageError) otherwise."""
        if is_data_uri(source):
            return decode_data_uri(source, self.max_bytes, name)
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._fetch(source, name)
        except TimeoutError:
            raise MediaError(f"{name}: fetching {_short(source)} took longer than {self.timeout_s:g} s.",
                             "image_fetch_failed") from None
        except httpx.HTTPError as exc:
            raise MediaError(f"{name}: {_short(source)} could not be fetched ({type(exc).__name__}).",
                             "image_fetch_failed") from None

    def _domain_allowed(self, host: str) -> bool:
        return any(host == d or d.startswith("*.") and host.endswith(d[1:]) for d in self.allowed)

    async def _checked_address(self, url: str, name: str) -> tuple[urllib.parse.SplitResult, str]:
        """The URL's parts and the address to connect to, or MediaError."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise MediaError(f"{name}: only data: URIs and http(s) URLs are accepted for images.")
        host = (parts.hostname or "").rstrip(".")
        if not host or parts.username is not None or parts.password is not None:
            raise MediaError(f"{name}: the image URL must name a host, without a user name or password.")
        if not self.allowed:
            raise MediaError(f"{name}: this server does not fetch image URLs; send the image as a data: URI "
                             "(data:image/jpeg;base64,...).")
        if not self._domain_allowed(host):
            raise MediaError(f"{name}: images are fetched only from {', '.join(self.allowed)}; {host} is not "
                             "among them.")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            addresses = [ipaddress.ip_address(a.split("%")[0]) for a in await self.resolver(host, port)]
        except (OSError, ValueError):
            raise MediaError(f"{name}: the host {host} could not be resolved.", "image_fetch_failed") from None
        if not addresses or not all(self.address_allowed(a) for a in addresses):
            raise MediaError(f"{name}: {host} resolves to an address that is not public; it is not fetched.")
        return parts, str(addresses[0])

    async def _fetch(self, url: str, name: str) -> bytes:
        async with httpx.AsyncClient(follow_redirects=False, trust_env=False, timeout=self.timeout_s) as client:
            for _ in range(self.max_redirects + 1):
                parts, address = await self._checked_address(url, name)
                async with client.stream("GET", _pinned(parts, address), headers={"Host": parts.netloc},
                                         extensions={"sni_hostname": parts.hostname}) as response:
                    if response.is_redirect and "location" in response.headers:
                        url = urllib.parse.urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise MediaError(f"{name}: {_short(url)} answered HTTP {response.status_code}.",
                                         "image_fetch_failed")
                    return await self._read(response, name)
        raise MediaError(f"{name}: {_short(url)} redirected more than {self.max_redirects} times.",
                         "image_fetch_failed")

    async def _read(self, response: httpx.Response, name: str) -> bytes:
        too_big = MediaError(f"{name} is larger than {self.max_bytes / 2**20:.1f} MB, the limit.", "image_fetch_failed")
        length = response.headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_bytes:
            raise too_big
        data = bytearray()
        async for chunk in response.aiter_bytes():
            data += chunk
            if len(data) > self.max_bytes:
                raise too_big
        return bytes(data)


def _pinned(parts: urllib.parse.SplitResult, address: str) -> str:
    """The URL with its host replaced by the checked address (IPv6 in brackets)."""
    host = f"[{address}]" if ":" in address else address
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit((parts.scheme, host + port, parts.path or "/", parts.query, ""))


def _short(url: str) -> str:
    return url if len(url) <= 80 else url[:77] + "..."
