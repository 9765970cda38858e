"""The drop-in routes of the old BLIP/BLIP2 service: /analyze, /v3/analyze, /v2/analyze[_file]."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping

from aiohttp import BodyPartReader, web

from ..domain import CaptionError, CaptionRequest, GenerationSettings, Source, TransientError
from ..localfiles import read_file, resolve_within
from .context import CONTEXT, HttpContext
from .responses import NO_INPUT, error_response, json_response, success_body

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}
MAX_PROMPT_CHARS = 500


class BadRequest(CaptionError):
    status = 400


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadRequest(f"{name}={raw!r} is not a boolean; use true or false")


def generation_from_query(query: Mapping[str, str], defaults: GenerationSettings) -> GenerationSettings:
    prompt = query.get("prompt") or None
    if prompt is not None and len(prompt) > MAX_PROMPT_CHARS:
        raise BadRequest(f"prompt is {len(prompt)} characters; at most {MAX_PROMPT_CHARS} are allowed")
    raw_n = query.get("num_captions", "1") or "1"
    try:
        num = int(raw_n)
    except ValueError:
        raise BadRequest(f"num_captions={raw_n!r} is not a whole number from 1 to 5") from None
    if not 1 <= num <= 5:
        raise BadRequest(f"num_captions={num} is out of range; use 1 to 5")
    return dataclasses.replace(defaults, prompt=prompt.strip() if prompt else None, num_captions=num)


async def _read_stream(stream: BodyPartReader | web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = await (stream.read_chunk(65536) if isinstance(stream, BodyPartReader) else stream.content.read(65536))
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise CaptionError(f"The upload is over MAX_FILE_SIZE={limit} bytes; send a smaller image", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


async def _read_upload(request: web.Request, limit: int) -> tuple[bytes, str]:
    ctype = request.content_type
    if request.content_length is not None and request.content_length > limit + 65536:
        raise CaptionError(
            f"The request body is {request.content_length} bytes, over MAX_FILE_SIZE={limit}", status=413
        )
    if ctype.startswith("multipart/"):
        reader = await request.multipart()
        async for part in reader:
            if isinstance(part, BodyPartReader) and part.name in ("file", "image"):
                data = await _read_stream(part, limit)
                return data, f"upload:{part.filename or 'file'}"
        raise BadRequest("The multipart form has no 'file' field; send the image as -F file=@photo.jpg")
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await _read_stream(request, limit), "upload"
    raise CaptionError(
        f"Content-Type {ctype or '(none)'} is not supported: POST multipart/form-data with a 'file' "
        "field, or the raw image with Content-Type image/* or application/octet-stream",
        status=415,
    )


async def _read_input(request: web.Request, ctx: HttpContext, url_key: str, file_key: str) -> tuple[bytes, str]:
    if request.method == "POST" and request.body_exists:
        return await _read_upload(request, ctx.settings.max_file_size)
    url = request.query.get(url_key) or None
    path = request.query.get(file_key) or None
    if (url is None) == (path is None):
        if url is not None:
            raise BadRequest(f"Give either {url_key} or {file_key}, not both")
        raise BadRequest(NO_INPUT)
    if url is not None:
        return await ctx.fetcher.fetch(url), url
    assert path is not None
    resolved = resolve_within(path, ctx.file_roots)
    loop = asyncio.get_running_loop()
    data, _stat = await loop.run_in_executor(None, read_file, resolved, ctx.settings.max_file_size)
    return data, str(resolved)


async def _analyze(request: web.Request, url_key: str, file_key: str) -> web.Response:
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    try:
        settings = generation_from_query(request.query, ctx.settings.generation())
        store = _flag(request.query, "store", True)
        refresh = _flag(request.query, "refresh", False)
        ctx.pipeline.ensure_ready()
        data, ref = await _read_input(request, ctx, url_key, file_key)
        caption_request = CaptionRequest(Source.HTTP, ref, data, settings, store=store, refresh=refresh)
        result = await asyncio.wrap_future(ctx.pipeline.submit(caption_request))
    except TransientError as exc:
        return error_response(exc.status, exc.message, time.perf_counter() - started, retry_after=exc.retry_after)
    except CaptionError as exc:
        return error_response(exc.status, exc.message, time.perf_counter() - started)
    if not result.ok:
        return error_response(
            result.error_status or 422,
            result.error or "The image could not be captioned",
            result.processing_time,
            image_sha256=result.image_sha256,
            record_id=result.record_id,
        )
    return json_response(success_body(result, ctx.pipeline.framework))


async def analyze(request: web.Request) -> web.Response:
    return await _analyze(request, "url", "file")


async def analyze_v2(request: web.Request) -> web.Response:
    """The old names: ?image_url= and ?file_path= (either route takes either)."""
    return await _analyze(request, "image_url", "file_path")


def add_routes(app: web.Application) -> None:
    for path in ("/analyze", "/v3/analyze"):
        app.router.add_get(path, analyze)
        app.router.add_post(path, analyze)
    app.router.add_get("/v2/analyze", analyze_v2)
    app.router.add_get("/v2/analyze_file", analyze_v2)
