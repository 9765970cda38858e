"""Fetch `?url=` images: one deadline for the whole fetch, a streamed byte cap, no internal addresses.

Which addresses may be reached is intake's `AddressPolicy`; here it is applied twice on purpose:
to the URL's literal host (in every spelling a resolver would accept), and inside the connector's
resolver, so the address checked is the address connected to (a DNS answer cannot change in
between), for every redirect hop.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

from .config import Settings
from .domain import BadInput, FetchFailed, Forbidden, TooLarge, Unsupported
from .intake import AddressPolicy, parse_host, parse_networks, public_url

_PAGE_TYPES = frozenset({"text/html", "application/xhtml+xml"})


class _ForbiddenAddress(OSError):
    pass


class _GuardedResolver(AbstractResolver):
    def __init__(self, policy: AddressPolicy) -> None:
        self._inner = DefaultResolver()
        self._policy = policy

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            reason = self._policy.refusal(ipaddress.ip_address(result["host"]))
            if reason is not None:
                raise _ForbiddenAddress(f"{host} resolves to {result['host']}, {reason}")
        return results

    async def close(self) -> None:
        await self._inner.close()


class UrlFetcher:
    def __init__(
        self,
        *,
        timeout: float,
        max_bytes: int,
        policy: AddressPolicy | None = None,
        max_redirects: int = 5,
    ) -> None:
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.policy = policy or AddressPolicy()
        self.max_redirects = max_redirects
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> UrlFetcher:
        policy = AddressPolicy(settings.allow_private_urls, parse_networks(settings.url_allow_networks))
        return cls(timeout=settings.url_timeout, max_bytes=settings.max_file_size, policy=policy)

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(resolver=_GuardedResolver(self.policy), limit=64)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": "blip2-service"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def fetch(self, url: str) -> bytes:
        """The image's bytes, within URL_TIMEOUT for the whole fetch, redirects included."""
        shown = public_url(url)
        try:
            async with asyncio.timeout(self.timeout):
                return await self._fetch(url, shown)
        except TimeoutError:
            raise FetchFailed(f"Fetching {shown} timed out after {self.timeout:g}s (URL_TIMEOUT)") from None

    async def _fetch(self, url: str, shown: str) -> bytes:
        target = self._parse(url)
        session = await self._client()
        for _hop in range(self.max_redirects + 1):
            target = self._check_literal(target)
            try:
                async with session.get(target, allow_redirects=False) as resp:
                    if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                        target = self._parse(str(target.join(URL(resp.headers["Location"]))))
                        continue
                    if resp.status >= 400:
                        raise FetchFailed(f"Fetching {shown} failed: the server answered HTTP {resp.status}")
                    return await self._read_capped(resp, shown)
            except aiohttp.ClientConnectorDNSError as exc:
                if isinstance(exc.os_error, _ForbiddenAddress):
                    raise self._refused(str(exc.os_error)) from None
                raise FetchFailed(f"Fetching {shown} failed: cannot resolve {target.host}") from None
            except aiohttp.ClientError as exc:
                raise FetchFailed(f"Fetching {shown} failed: {type(exc).__name__}") from None
        raise FetchFailed(f"Fetching {shown} failed: more than {self.max_redirects} redirects")

    async def _read_capped(self, resp: aiohttp.ClientResponse, shown: str) -> bytes:
        declared = resp.content_length
        if declared is not None and declared > self.max_bytes:
            raise TooLarge(f"The image at {shown} is {declared} bytes, over MAX_FILE_SIZE={self.max_bytes}")
        chunks: list[bytes] = []
        total = 0
        async for chunk in resp.content.iter_chunked(65536):
            total += len(chunk)
            if total > self.max_bytes:
                raise TooLarge(f"The image at {shown} is over MAX_FILE_SIZE={self.max_bytes} bytes")
            chunks.append(chunk)
        data = b"".join(chunks)
        if resp.content_type in _PAGE_TYPES and data.lstrip()[:1] == b"<":
            # The commonest ?url= mistake: the page an image is shown on, not the image.
            raise Unsupported(
                f"{shown} is a web page ({resp.content_type}), not an image; give the image's own URL "
                "(in a browser: right-click the image, Copy Image Address)"
            )
        return data

    @staticmethod
    def _parse(url: str) -> URL:
        try:
            parsed = URL(url)
            host = parsed.host
        except (ValueError, TypeError, UnicodeError):
            raise BadInput(f"Not a valid URL: {public_url(url)!r}") from None
        if parsed.scheme not in ("http", "https") or not host:
            raise BadInput(f"Only http:// and https:// URLs with a host can be fetched, not {public_url(url)!r}")
        return parsed

    def _check_literal(self, target: URL) -> URL:
        """Refuse a literal internal address in any spelling; write a legacy numeric form canonically."""
        host = target.host or ""
        ip = parse_host(host)
        if ip is None:
            return target  # a name: the resolver checks every address it resolves to
        reason = self.policy.refusal(ip)
        if reason is not None:
            raise self._refused(f"{host} is {reason}")
        canonical = str(ip) if ip.version == 4 else f"[{ip}]"
        return target if host.strip("[]") == str(ip) else target.with_host(canonical.strip("[]"))

    @staticmethod
    def _refused(detail: str) -> Forbidden:
        return Forbidden(
            f"Refusing to fetch: {detail}. URLs to loopback, private, link-local or metadata addresses are "
            "blocked; allow an intranet with URL_ALLOW_NETWORKS (CIDRs) or ALLOW_PRIVATE_URLS=true"
        )
