"""The HTTP listener, with a ceiling on open connections (MAX_CONNECTIONS).

Clients that open connections and never finish a request (slowloris, a crashed load balancer, a
scanner) each hold a file descriptor until REQUEST_TIMEOUT. Past the process's open-file limit
`accept()` fails with EMFILE: the database, the model and watched files can no longer be opened,
and asyncio logs every failed accept with a traceback, a flood of hundreds of thousands of
lines a minute. Below the ceiling nothing changes; at it, a new connection is answered at once
with a 503 and closed, so descriptors are never exhausted and the client is told to come back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Callable

from aiohttp import web
from yarl import URL

from ..outcome import error_body

log = logging.getLogger(__name__)

# How often, at most, the log says connections are being refused.
REFUSED_LOG_SECONDS = 60.0
AUTO_CEILING = 10_000
# How long a refused connection is drained before it is closed.
LINGER_SECONDS = 1.0


def raise_open_file_limit() -> int:
    """Raise this process's soft open-file limit to its hard limit (many systems start services at
    1,024 with a far higher hard limit) and return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:  # e.g. macOS caps below an unlimited hard limit
            log.debug("could not raise the open-file limit to %d: %s", wanted, exc)
    return int(soft) if soft != resource.RLIM_INFINITY else 1 << 20


def connection_ceiling(configured: int, open_files: int) -> int:
    """MAX_CONNECTIONS, or with 0 (auto) half the open-file limit (the other half is for the
    store, the model's files, watched files and the broker), at most AUTO_CEILING."""
    if configured > 0:
        return configured
    return max(1, min(open_files // 2, AUTO_CEILING))


def _busy_response(limit: int) -> bytes:
    body = json.dumps(
        error_body(f"The server holds its most open connections (MAX_CONNECTIONS={limit}); retry in a moment", 0.0)
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        "Content-Type: application/json; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Refused(asyncio.Protocol):
    """Answers 503 without parsing the request, then closes.

    The request is read and dropped for up to LINGER_SECONDS: closing a socket with unread
    bytes makes the kernel reset it, and the client would lose the 503 it was sent.
    """

    def __init__(self, response: bytes) -> None:
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self.response)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER_SECONDS, transport.close)

    def data_received(self, data: bytes) -> None:
        pass  # the request of a client that is turned away

    def eof_received(self) -> bool:
        return False  # the client is done sending: close


class CappedSite(web.BaseSite):
    """aiohttp's TCP site, with new connections past `limit` refused as above."""

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, *, limit: int, on_refused: Callable[[], None] | None = None
    ) -> None:
        super().__init__(runner)
        self.host = host
        self.port = port
        self.limit = limit
        self._on_refused = on_refused
        self._response = _busy_response(limit)
        self._last_log = float("-inf")
        self._unlogged = 0

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self.host, port=self.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None

        def protocol() -> asyncio.BaseProtocol:
            if len(server.connections) < self.limit:
                return server()
            self._refuse()
            return _Refused(self._response)

        self._server = await asyncio.get_running_loop().create_server(
            protocol, self.host, self.port, reuse_address=True
        )

    def _refuse(self) -> None:
        self._unlogged += 1
        if self._on_refused is not None:
            self._on_refused()
        now = time.monotonic()
        if now - self._last_log >= REFUSED_LOG_SECONDS:
            log.warning(
                "refused %d new connections with 503: MAX_CONNECTIONS=%d are open "
                "(clients that never finish a request are closed after REQUEST_TIMEOUT)",
                self._unlogged,
                self.limit,
            )
            self._last_log = now
            self._unlogged = 0
