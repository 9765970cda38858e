"""Logging set-up: plain text for people, one JSON object a line for log shippers."""

from __future__ import annotations

import logging
import sys
import time
from datetime import UTC, datetime

from aiohttp.http_exceptions import HttpProcessingError

from .domain import json_text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            payload["exception"] = self.formatException(record.exc_info)
        return json_text(payload)  # a file name that is not UTF-8 still makes a valid UTF-8 line


class MalformedRequestFilter(logging.Filter):
    """aiohttp logs every malformed HTTP request (a NUL in a header, a bad request line) at ERROR
    with a traceback, before any handler or key check: anyone could fill the log. One INFO line
    instead; the client already got its 400."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            detail = (getattr(exc, "message", "") or type(exc).__name__).strip().splitlines()[0]
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args, record.exc_info, record.exc_text = (
                "rejected a malformed HTTP request: %s",
                (detail,),
                None,
                None,
            )
        return True


class AcceptFailureFilter(logging.Filter):
    """asyncio logs every failed accept() (EMFILE: out of file descriptors) at ERROR with a
    traceback, and retries many times a second: hundreds of thousands of lines a minute. One
    line a minute instead, saying how many were held back and what to do."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last = float("-inf")
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        if message.startswith("Exception in callback BaseSelectorEventLoop._start_serving"):
            # asyncio schedules a retry per failed accept; those still pending when the listener
            # closes fail on its closed socket, each with a traceback. Nothing is lost: drop them.
            return False
        if not message.startswith("socket.accept() out of system resource"):
            return True
        now = time.monotonic()
        if now - self._last < self.every:
            self._held += 1
            return False
        exc = record.exc_info[1] if record.exc_info else None
        record.msg, record.args, record.exc_info, record.exc_text = (
            "cannot accept HTTP connections: %s (%d more such failures since the last line); "
            "raise the open-file limit (ulimit -n) or lower MAX_CONNECTIONS",
            (exc or "out of a system resource", self._held),
            None,
            None,
        )
        self._last, self._held = now, 0
        return True


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that are chatty at INFO: keep their warnings only.
    for noisy in ("transformers", "httpx", "urllib3", "aiohttp.access", "alembic", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
    loop_log = logging.getLogger("asyncio")
    if not any(isinstance(f, AcceptFailureFilter) for f in loop_log.filters):
        loop_log.addFilter(AcceptFailureFilter())
