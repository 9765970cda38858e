"""The drop-in routes of the old BLIP/BLIP2 service: /analyze, /v3/analyze, /v2/analyze[_file]."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Mapping
from functools import partial

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from ..domain import (
    BadInput,
    CaptionError,
    CaptionRequest,
    GenerationSettings,
    Source,
    TransientError,
    Unsupported,
)
from ..intake import body_deadline, check_prompt, check_size, public_url, read_path, read_stream
from ..outcome import success_body
from .context import CONTEXT, HttpContext
from .responses import NO_INPUT, error_response, json_response

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _flag(query: Mapping[str, str], name: str, default: bool) -> bool:
    raw = query.get(name)
    if raw is None or raw == "":
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise BadInput(f"{name}={raw!r} is not a boolean; use true or false")


def generation_from_query(query: Mapping[str, str], defaults: GenerationSettings) -> GenerationSettings:
    prompt = check_prompt(query.get("prompt"))
    raw_n = query.get("num_captions", "1") or "1"
    try:
        num = int(raw_n)
    except ValueError:
        raise BadInput(f"num_captions={raw_n!r} is not a whole number from 1 to 5") from None
    if not 1 <= num <= 5:
        raise BadInput(f"num_captions={num} is out of range; use 1 to 5")
    return dataclasses.replace(defaults, prompt=prompt, num_captions=num)


async def _read_upload(request: web.Request, limit: int, deadline: float) -> tuple[bytes, str]:
    ctype = request.content_type
    check_size(request.content_length, limit)
    try:
        if ctype.startswith("multipart/"):
            async with body_deadline(deadline):
                try:
                    reader = await request.multipart()
                except (ValueError, AssertionError, KeyError) as exc:
                    raise BadInput(
                        f"The multipart body cannot be read ({exc}); send it as -F file=@photo.jpg"
                    ) from None
                async for part in reader:
                    if isinstance(part, BodyPartReader) and part.name in ("file", "image"):
                        data = await read_stream(partial(part.read_chunk, 65536), limit, deadline=deadline)
                        return data, f"upload:{part.filename or 'file'}"
            raise BadInput("The multipart form has no 'file' field; send the image as -F file=@photo.jpg")
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return await read_stream(lambda: request.content.read(65536), limit, deadline=deadline), "upload"
    except (HttpProcessingError, RequestPayloadError, ValueError, AssertionError) as exc:
        # A body that does not match its own framing: a bad boundary, a gzip header over
        # bytes that are not gzip, a chunk size that is not hex.
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise BadInput(f"The request body cannot be read: {detail}") from None
    raise Unsupported(
        f"Content-Type {ctype or '(none)'} is not supported: POST multipart/form-data with a 'file' "
        "field, or the raw image with Content-Type image/* or application/octet-stream"
    )


async def _read_input(
    request: web.Request, ctx: HttpContext, url_key: str, file_key: str, deadline: float
) -> tuple[bytes, str]:
    if request.method == "POST" and request.body_exists:
        return await _read_upload(request, ctx.settings.max_file_size, deadline)
    url = request.query.get(url_key) or None
    path = request.query.get(file_key) or None
    if (url is None) == (path is None):
        if url is not None:
            raise BadInput(f"Give either {url_key} or {file_key}, not both")
        raise BadInput(NO_INPUT)
    if url is not None:
        return await ctx.fetcher.fetch(url), public_url(url)
    assert path is not None
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, read_path, path, ctx.file_roots, ctx.settings.max_file_size)
    return found.data, found.real_path


async def model_ready(ctx: HttpContext) -> None:
    """Refuse (503) before the upload is read when it could not be captioned now. Waits (up to
    LOAD_WAIT_SECONDS) while the model loads or warms, instead of answering 503: the legacy
    service's clients take any answer as final, and a client that gives up first sees no
    answer, which they retry."""
    if ctx.gateway is not None:
        ctx.gateway.ensure_ready()
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ctx.settings.load_wait_seconds
    while ctx.holder.status in ("loading", "warming") and loop.time() < deadline:
        await asyncio.sleep(0.1)
    ctx.pipeline.ensure_ready()


async def _analyze(request: web.Request, url_key: str, file_key: str) -> web.Response:
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    try:
        settings = generation_from_query(request.query, ctx.settings.generation())
        store = _flag(request.query, "store", True)
        refresh = _flag(request.query, "refresh", False)
        await model_ready(ctx)
        deadline = asyncio.get_running_loop().time() + ctx.settings.request_timeout
        data, ref = await _read_input(request, ctx, url_key, file_key, deadline)
        caption_request = CaptionRequest(Source.HTTP, ref, data, settings, store=store, refresh=refresh)
        submit = ctx.gateway.submit if ctx.gateway is not None else ctx.pipeline.submit
        result = await asyncio.wrap_future(submit(caption_request))
    except TransientError as exc:
        return error_response(exc.status, exc.message, time.perf_counter() - started, retry_after=exc.retry_after)
    except CaptionError as exc:
        response = error_response(exc.status, exc.message, time.perf_counter() - started)
        if request.body_exists and not request.content.is_eof():
            # Refused before the body was read (too slow, too large, malformed): close instead
            # of draining the rest of it.
            response.force_close()
        return response
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
