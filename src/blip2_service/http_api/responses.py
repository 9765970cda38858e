"""The legacy JSON bodies, byte-for-byte in shape: clients of the old service parse these."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ..domain import json_text
from ..outcome import error_body

NO_INPUT = "Must provide either url or file parameter, or POST a file"


def error_response(
    status: int, message: str, processing_time: float = 0.0, *, retry_after: float | None = None, **extra: Any
) -> web.Response:
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return web.json_response(
        error_body(message, processing_time, **extra),
        status=status,
        headers=headers,
        dumps=_dumps,
    )


def json_response(body: Any, status: int = 200) -> web.Response:
    return web.json_response(body, status=status, dumps=_dumps)


def _dumps(obj: Any) -> str:
    # Emojis as themselves, not \ud83d escapes: humans read these bodies too.
    return json_text(obj)
