"""Stored results: /captions (filters, search, keyset paging), /captions/{id}, /images/{sha256}."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, TypeVar

from aiohttp import web

from ..domain import CaptionError, CaptionRequest, Source, TransientError
from ..emoji.mapper import EmojiMapper
from ..intake import MAX_PATH_CHARS
from ..outcome import success_body
from ..reprocess import read_copy
from ..store.repository import MAX_ID, CaptionFilter, CaptionRepository, decode_cursor
from .context import CONTEXT
from .legacy import model_ready
from .responses import json_response

T = TypeVar("T")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^[0-9]{1,30}$", re.ASCII)
_STATUSES = ("succeeded", "failed")


def _problem(status: int, message: str, retry_after: float | None = None) -> web.Response:
    response = json_response({"error": {"message": message}}, status=status)
    if retry_after is not None:
        response.headers["Retry-After"] = str(max(1, round(retry_after)))
    return response


async def _in_executor(fn: Callable[[], T]) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def _store(request: web.Request) -> CaptionRepository:
    store = request.app[CONTEXT].store
    if store is None:
        raise web.HTTPNotFound(text="no store configured")
    return store


def _parse_time(name: str, raw: str | None) -> datetime | None:
    """An ISO 8601 time as UTC (no offset: UTC); one past the years 1-9999 in UTC is clamped to them."""
    if not raw:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00").replace(" ", "+"))
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not an ISO 8601 time such as 2026-11-27T10:00:00Z") from None
    try:
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).astimezone(UTC)
    except OverflowError:
        # Past the first or last instant a datetime holds once in UTC: the bound of time itself.
        return (datetime.max if value.year >= 9999 else datetime.min).replace(tzinfo=UTC)


def parse_filters(query: Any, mapper: EmojiMapper) -> tuple[CaptionFilter, int, str | None]:
    """Validate /captions parameters; ValueError carries the message for a 400. The emojis in
    `q` (🐶, as the page shows them) become an emoji filter, its words a full-text search."""
    source = query.get("source") or None
    if source is not None and source not in {s.value for s in Source}:
        raise ValueError(f"source={source!r} is not one of http, watch, queue, cli")
    status = query.get("status") or None
    if status is not None and status not in _STATUSES:
        raise ValueError(f"status={status!r} is not one of succeeded, failed")
    raw_limit = query.get("limit", "50")
    try:
        limit = int(raw_limit)
    except ValueError:
        raise ValueError(f"limit={raw_limit!r} is not a whole number from 1 to 500") from None
    if not 1 <= limit <= 500:
        raise ValueError(f"limit={limit} is out of range; use 1 to 500")
    cursor = query.get("cursor") or None
    if cursor is not None:
        try:
            decode_cursor(cursor)
        except Exception:
            raise ValueError("cursor is not valid; pass the next_cursor of a previous page unchanged") from None
    for name, most in (("q", 500), ("model", 200), ("path", MAX_PATH_CHARS)):
        if len(query.get(name) or "") > most:
            raise ValueError(f"{name} is {len(query.get(name))} characters; at most {most} are allowed")
    since = _parse_time("since", query.get("since"))
    until = _parse_time("until", query.get("until"))
    emojis, words = mapper.emojis_in(query.get("q") or "")
    flt = CaptionFilter(
        q=words.strip() or None,
        emojis=emojis,
        source=source,
        model=query.get("model") or None,
        status=status,
        path=query.get("path") or None,
        since=since,
        until=until,
    )
    return flt, limit, cursor


async def list_captions(request: web.Request) -> web.Response:
    try:
        flt, limit, cursor = parse_filters(request.query, request.app[CONTEXT].mapper)
    except ValueError as exc:
        return _problem(400, str(exc))
    store = _store(request)
    try:
        items, next_cursor = await _in_executor(partial(store.query, flt, limit=limit, cursor=cursor))
    except TransientError as exc:
        return _problem(503, exc.message, exc.retry_after)
    return json_response({"items": items, "next_cursor": next_cursor})


async def _lookup(
    request: web.Request, fetch: Callable[[CaptionRepository], T | None], missing: str
) -> T | web.Response:
    """Run one store read off the loop: 503 while the store is down, 404 when absent."""
    store = _store(request)
    try:
        found = await _in_executor(partial(fetch, store))
    except TransientError as exc:
        return _problem(503, exc.message, exc.retry_after)
    return _problem(404, missing) if found is None else found


def _sha(request: web.Request) -> str | None:
    sha = request.match_info["sha256"].lower()
    return sha if _SHA_RE.match(sha) else None


_BAD_SHA = "An image is named by the 64 hex digits of its sha256"


async def _by_sha(
    request: web.Request, fetch: Callable[[CaptionRepository, str], T | None], missing: str
) -> T | web.Response:
    """`_lookup` for the image the path names: 400 when it names none, `missing` has `{sha}`."""
    sha = _sha(request)
    if sha is None:
        return _problem(400, _BAD_SHA)
    return await _lookup(request, lambda store: fetch(store, sha), missing.format(sha=sha))


async def get_caption(request: web.Request) -> web.Response:
    raw = request.match_info["id"]
    if not _ID_RE.match(raw):
        return _problem(400, f"caption id {raw[:40]!r} is not a number")
    if int(raw) > MAX_ID:
        return _problem(404, f"No caption with id {raw}")
    item = await _lookup(request, lambda store: store.get(int(raw)), f"No caption with id {raw}")
    return item if isinstance(item, web.Response) else json_response(item)


async def get_image(request: web.Request) -> web.Response:
    info = await _by_sha(request, CaptionRepository.image, "No image with sha256 {sha}")
    return info if isinstance(info, web.Response) else json_response(info)


async def get_thumbnail(request: web.Request) -> web.Response:
    data = await _by_sha(request, CaptionRepository.thumbnail, "No thumbnail for {sha}")
    if isinstance(data, web.Response):
        return data
    return web.Response(
        body=data, content_type="image/jpeg", headers={"Cache-Control": "public, max-age=31536000, immutable"}
    )


async def caption_image(request: web.Request) -> web.Response:
    """Caption a stored image again (the page's "caption again"), from a sighting whose file is
    still readable inside FILE_ROOTS, with the current model and settings."""
    ctx = request.app[CONTEXT]
    info = await _by_sha(request, CaptionRepository.image, "No image with sha256 {sha}")
    if isinstance(info, web.Response):
        return info
    sha = info["sha256"]
    paths = [loc["source_ref"] for loc in info["locations"] if loc["source_ref"].startswith("/")]
    try:
        await model_ready(ctx)
        found = await _in_executor(partial(read_copy, sha, paths, ctx.file_roots, ctx.settings.max_file_size))
        again = CaptionRequest(
            Source.HTTP,
            found.real_path,
            found.data,
            ctx.settings.generation(),
            refresh=True,
            file_size=found.size,
            file_mtime=found.mtime,
        )
        submit = ctx.gateway.submit if ctx.gateway is not None else ctx.pipeline.submit
        result = await asyncio.wrap_future(submit(again))
    except TransientError as exc:
        return _problem(exc.status, exc.message, exc.retry_after)
    except CaptionError as exc:
        return _problem(exc.status, exc.message)
    if not result.ok:
        return _problem(result.error_status or 422, result.error or "The image could not be captioned")
    return json_response(success_body(result, ctx.pipeline.framework))


def add_routes(app: web.Application) -> None:
    app.router.add_get("/captions", list_captions)
    app.router.add_get("/captions/{id}", get_caption)
    app.router.add_get("/images/{sha256}", get_image)
    app.router.add_get("/images/{sha256}/thumbnail", get_thumbnail)
    app.router.add_post("/images/{sha256}/caption", caption_image)
