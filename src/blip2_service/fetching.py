"""Fetch `?url=` images safely: timeout, streamed byte cap, and no requests to internal addresses.

The address check happens twice on purpose: on the URL's literal host, and
inside the connector's resolver, so the address we check is the address we
connect to (a DNS answer cannot change in between), for every redirect hop.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .config import Settings
from .domain import PermanentError

AddressPolicy = Callable[[ipaddress.IPv4Address | ipaddress.IPv6Address], bool]


class UrlRefused(PermanentError):
    status = 403


class UrlFetchFailed(PermanentError):
    status = 502


class BadUrl(PermanentError):
    status = 400


class ImageTooLargeDownload(PermanentError):
    status = 413


class _ForbiddenAddress(OSError):
    pass


def is_internal_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, private, link-local (cloud metadata 169.254.169.254), CGNAT, reserved, multicast."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return is_internal_address(ip.ipv4_mapped)
    return not ip.is_global or ip.is_multicast


class _GuardedResolver(AbstractResolver):
    def __init__(self, forbidden: AddressPolicy) -> None:
        self._inner = DefaultResolver()
        self._forbidden = forbidden

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            if self._forbidden(ipaddress.ip_address(result["host"])):
                raise _ForbiddenAddress(f"{host} resolves to the internal address {result['host']}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class UrlFetcher:
    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        allow_private: bool,
        forbidden: AddressPolicy = is_internal_address,
        max_redirects: int = 5,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.allow_private = allow_private
        self._forbidden: AddressPolicy = (lambda _ip: False) if allow_private else forbidden
        self.max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlFetcher:
        return cls(
            timeout=settings.url_timeout, max_bytes=settings.max_file_size, allow_private=settings.allow_private_urls
        )

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_GuardedResolver(self._forbidden), limit=64)
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                headers={"User-Agent": "blip2-service"},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> bytes:
        target = self._parse(url)
        session = await self._client()
        for _hop in range(self.max_redirects + 1):
            self._check_literal(target)
            try:
                async with session.get(target, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        target = self._parse(str(target.join(URL(resp.headers["Location"]))))
                        continue
                    if resp.status >= 400:
                        raise UrlFetchFailed(f"Fetching {url} failed: the server answered HTTP {resp.status}")
                    return await self._read_capped(resp, url)
            except aiohttp.ClientConnectorDNSError as exc:
                if isinstance(exc.os_error, _ForbiddenAddress):
                    raise self._refused(str(exc.os_error)) from None
                raise UrlFetchFailed(f"Fetching {url} failed: cannot resolve {target.host}") from None
            except TimeoutError:
                raise UrlFetchFailed(f"Fetching {url} timed out after {self.timeout:g}s (URL_TIMEOUT)") from None
            except aiohttp.ClientError as exc:
                raise UrlFetchFailed(f"Fetching {url} failed: {exc}") from None
        raise UrlFetchFailed(f"Fetching {url} failed: more than {self.max_redirects} redirects")

    async def _read_capped(self, resp: aiohttp.ClientResponse, url: str) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise ImageTooLargeDownload(f"The image at {url} is {declared} bytes, over MAX_FILE_SIZE={self.max_bytes}")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageTooLargeDownload(f"The image at {url} is over MAX_FILE_SIZE={self.max_bytes} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    @staticmethod
    def _parse(url: str) -> URL:
        try:
            parsed = URL(url)
        except (ValueError, TypeError):
            raise BadUrl(f"Not a valid URL: {url!r}") from None
        if parsed.scheme not in ("http", "https") or not parsed.host:
            raise BadUrl(f"Only http:// and https:// URLs with a host can be fetched, not {url!r}")
        return parsed

    def _check_literal(self, target: URL) -> None:
        host = (target.host or "").strip("[]")
        try:
            ip: Any = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: the resolver checks what it resolves to
        if self._forbidden(ip):
            raise self._refused(f"{host} is an internal address")

    @staticmethod
    def _refused(detail: str) -> UrlRefused:
        return UrlRefused(
            f"Refusing to fetch: {detail}. URLs to loopback, private, link-local or metadata "
            "addresses are blocked; set ALLOW_PRIVATE_URLS=true to allow them"
        )
