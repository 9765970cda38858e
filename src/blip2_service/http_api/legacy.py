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
    TooLarge,
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


# The options a form may carry beside its file (`curl -F file=@x.jpg -F prompt=...`), read as if
# they were in the query. Other fields are skipped, as the legacy service skipped them.
FORM_OPTIONS = ("prompt", "num_captions", "store", "refresh")
FORM_OPTION_BYTES = 4096


@dataclasses.dataclass
class Upload:
    data: bytes
    ref: str
    options: dict[str, str] = dataclasses.field(default_factory=dict)


async def _read_upload(request: web.Request, limit: int, deadline: float) -> Upload:
    ctype = request.content_type
    check_size(request.content_length, limit)
    try:
        if ctype.startswith("multipart/"):
            async with body_deadline(deadline):
                return await _read_form(request, limit, deadline)
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            return Upload(await read_stream(lambda: request.content.read(65536), limit, deadline=deadline), "upload")
    except (HttpProcessingError, RequestPayloadError, ValueError, AssertionError) as exc:
        # A body that does not match its own framing: a bad boundary, a gzip header over
        # bytes that are not gzip, a chunk size that is not hex.
        detail = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        raise BadInput(f"The request body cannot be read: {detail}") from None
    raise Unsupported(
        f"Content-Type {ctype or '(none)'} is not supported: POST multipart/form-data with a 'file' "
        "field, or the raw image with Content-Type image/* or application/octet-stream"
    )


async def _read_form(request: web.Request, limit: int, deadline: float) -> Upload:
    """The form's image (field `file`, or `image`) and its option fields, to the end of the body:
    an option may come after the file (curl sends fields in the order given)."""
    try:
        reader = await request.multipart()
    except (ValueError, AssertionError, KeyError) as exc:
        raise BadInput(f"The multipart body cannot be read ({exc}); send it as -F file=@photo.jpg") from None
    upload: Upload | None = None
    options: dict[str, str] = {}
    async for part in reader:
        if not isinstance(part, BodyPartReader):
            continue  # a nested multipart: nothing of ours in it
        if part.name in ("file", "image") and upload is None:
            data = await read_stream(partial(part.read_chunk, 65536), limit, deadline=deadline)
            upload = Upload(data, f"upload:{part.filename or 'file'}", options)
        elif part.name in FORM_OPTIONS:
            if part.name in options:
                raise BadInput(f"The form gives {part.name} twice; give it once")
            options[part.name] = await _form_text(part, deadline)
    if upload is None:
        raise BadInput("The multipart form has no 'file' field; send the image as -F file=@photo.jpg")
    return upload


async def _form_text(part: BodyPartReader, deadline: float) -> str:
    name = part.name
    try:
        raw = await read_stream(partial(part.read_chunk, FORM_OPTION_BYTES), FORM_OPTION_BYTES, deadline=deadline)
    except TooLarge:
        raise BadInput(f"The form field {name} is over {FORM_OPTION_BYTES} bytes") from None
    try:
        return raw.decode(part.get_charset("utf-8"))
    except (UnicodeDecodeError, LookupError):
        raise BadInput(f"The form field {name} is not UTF-8 text") from None


def with_form_options(query: Mapping[str, str], options: Mapping[str, str]) -> Mapping[str, str]:
    """The query's options with the form's added; one given in both with two values is refused
    (which was meant?)."""
    merged = dict(query)
    for name, value in options.items():
        if name in query and query[name] != value:
            raise BadInput(f"{name} is given in the query ({query[name]!r}) and in the form ({value!r}); give it once")
        merged[name] = value
    return merged


async def _read_input(request: web.Request, ctx: HttpContext, url_key: str, file_key: str, deadline: float) -> Upload:
    if request.method == "POST" and request.body_exists:
        return await _read_upload(request, ctx.settings.max_file_size, deadline)
    url = request.query.get(url_key) or None
    path = request.query.get(file_key) or None
    if (url is None) == (path is None):
        if url is not None:
            raise BadInput(f"Give either {url_key} or {file_key}, not both")
        raise BadInput(NO_INPUT)
    if url is not None:
        return Upload(await ctx.fetcher.fetch(url), public_url(url))
    assert path is not None
    loop = asyncio.get_running_loop()
    found = await loop.run_in_executor(None, read_path, path, ctx.file_roots, ctx.settings.max_file_size)
    return Upload(found.data, found.real_path)


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


def _options(query: Mapping[str, str], ctx: HttpContext) -> tuple[GenerationSettings, bool, bool]:
    """The generation settings, `store` and `refresh` an analyze request asks for."""
    return (
        generation_from_query(query, ctx.settings.generation()),
        _flag(query, "store", True),
        _flag(query, "refresh", False),
    )


async def _analyze(request: web.Request, url_key: str, file_key: str) -> web.Response:
    ctx = request.app[CONTEXT]
    started = time.perf_counter()
    try:
        settings, store, refresh = _options(request.query, ctx)  # a bad query: refused before the body
        await model_ready(ctx)
        deadline = asyncio.get_running_loop().time() + ctx.settings.request_timeout
        upload = await _read_input(request, ctx, url_key, file_key, deadline)
        if upload.options:
            settings, store, refresh = _options(with_form_options(request.query, upload.options), ctx)
        caption_request = CaptionRequest(Source.HTTP, upload.ref, upload.data, settings, store=store, refresh=refresh)
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
