"""The aiohttp application: routes plus the middlewares every route shares."""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import web

from .. import __version__
from . import legacy, results
from .context import CONTEXT, HttpContext
from .openapi import openapi_document
from .responses import error_response, json_response

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = frozenset({"/health", "/metrics", "/", "/openapi.json"})
_ANALYZE_PREFIXES = ("/analyze", "/v3/analyze", "/v2/analyze")


def _is_analyze(path: str) -> bool:
    return path.startswith(_ANALYZE_PREFIXES)


def _problem(request: web.Request, status: int, message: str) -> web.Response:
    if _is_analyze(request.path):
        return error_response(status, message)
    return json_response({"error": {"message": message}}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as JSON with a message that says what to do; 500 only for bugs."""
    try:
        return await handler(request)
    except ConnectionResetError:
        # The client went away mid-request (closed the socket during its upload): not our error.
        log.info("client disconnected during %s %s", request.method, request.path)
        return _problem(request, 400, "The client disconnected before the request was complete")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        messages = {
            404: f"No route {request.path}; see /openapi.json for the routes",
            405: f"{request.method} is not allowed on {request.path}",
            413: "The request body is over the size limit (MAX_FILE_SIZE)",
        }
        response = _problem(request, exc.status, messages.get(exc.status, exc.reason))
        if "Allow" in exc.headers:  # RFC 9110: a 405 says which methods the route has
            response.headers["Allow"] = exc.headers["Allow"]
        return response
    except Exception:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return _problem(request, 500, "Internal error (a bug): the log has the details")


def cors_middleware(origins: list[str]) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    allow_all = "*" in origins

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        allowed = origin is not None and (allow_all or origin in origins)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        if allowed:
            response.headers["Access-Control-Allow-Origin"] = "*" if allow_all else origin  # type: ignore[assignment]
            if not allow_all:
                response.headers["Vary"] = "Origin"
            if request.method == "OPTIONS":
                response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
                response.headers["Access-Control-Allow-Headers"] = "Authorization, X-API-Key, Content-Type"
                response.headers["Access-Control-Max-Age"] = "600"
        return response

    return middleware


def request_key(request: web.Request) -> bytes:
    """The API key a request carries (X-API-Key or Authorization: Bearer), as bytes."""
    given = request.headers.get("X-API-Key", "")
    auth = request.headers.get("Authorization", "")
    if not given and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    # Header bytes that are not UTF-8 arrive as surrogates: compare them as the bytes they were.
    return given.encode("utf-8", "surrogateescape")


def auth_middleware(api_key: str) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    expected = api_key.encode()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path in _OPEN_PATHS:
            return await handler(request)
        given = request_key(request)
        if not given:
            return _problem(request, 401, "Missing API key: send Authorization: Bearer <key> or X-API-Key: <key>")
        if not hmac.compare_digest(given, expected):
            return _problem(request, 401, "Wrong API key: check the API_KEY the service was started with")
        return await handler(request)

    return middleware


def metrics_middleware(ctx: HttpContext) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        response = await handler(request)
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        ctx.metrics.http_requests.labels(name, str(response.status)).inc()
        return response

    return middleware


async def health(request: web.Request) -> web.Response:
    """Status for anyone; paths, hosts and last errors only with the API key or HEALTH_DETAILS=true."""
    ctx = request.app[CONTEXT]
    holder = ctx.holder
    store_problem = None
    if ctx.store is not None:
        store_problem = await asyncio.get_running_loop().run_in_executor(None, ctx.store.write_problem)
    # Healthy: the model loaded here (a gateway's is the workers', a publishing watcher loads
    # none) and nothing in `unavailable` below.
    if ctx.gateway is not None:
        model_status = "gateway"
    elif not ctx.model_used:  # a publishing watcher (HEALTH_PORT): the workers caption its files
        model_status = "none"
    else:
        model_status = holder.status
    body: dict[str, object] = {
        "status": "unhealthy",  # settled at the end, listed first
        "model_status": model_status,
        "device": str(holder.captioner.loaded.device) if holder.captioner else ctx.device_hint,
        "model": ctx.settings.model,
        "version": __version__,
        "pending": ctx.gateway.pending if ctx.gateway is not None else ctx.pipeline.pending,
        "store": "down" if store_problem else "up",
    }
    if holder.captioner is not None:
        body["dtype"] = str(holder.captioner.loaded.dtype).removeprefix("torch.")
        decoder = holder.captioner.decoder
        body["decode"] = {
            "compiled": decoder is not None,
            "buckets": list(decoder.buckets) if decoder is not None else [],
            "warm_seconds": round(holder.warm_seconds, 3) if holder.warm_seconds is not None else None,
        }
    if holder.error:
        body["error"] = holder.error
    unavailable = ["store"] if store_problem else []
    broker_problem = ctx.broker_problem()  # a gateway's connection among them
    if broker_problem:
        body["broker"] = "down"
        unavailable.append("broker")
    if ctx.gateway is not None:
        body["workers"] = ctx.gateway.workers
        if not ctx.gateway.workers:
            unavailable.append("workers")
    unavailable.extend(ctx.adapter_problems())
    if unavailable:
        body["unavailable"] = unavailable
    healthy = model_status in ("loaded", "gateway", "none") and not unavailable
    body["status"] = "healthy" if healthy else "unhealthy"
    api_key = ctx.settings.api_key
    if ctx.settings.health_details or (api_key and hmac.compare_digest(request_key(request), api_key.encode())):
        if store_problem:
            body["store_error"] = store_problem
        if broker_problem:
            body["broker_error"] = broker_problem
        body.update(ctx.health_extras())
    return json_response(body, status=200 if healthy else 503)


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})


async def openapi(request: web.Request) -> web.Response:
    return json_response(openapi_document(__version__))


async def index(request: web.Request) -> web.Response:
    html = resources.files("blip2_service.http_api").joinpath("static/index.html").read_text("utf-8")
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def make_probe_app(ctx: HttpContext) -> web.Application:
    """`/health` and `/metrics` alone, for `consume` and `watch` (HEALTH_PORT): the same answers
    as the API's, so one probe and one scrape configuration fit every process of a deployment."""
    app = web.Application(middlewares=[errors_middleware])
    app[CONTEXT] = ctx
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    return app


def make_app(ctx: HttpContext) -> web.Application:
    middlewares: list[Any] = [errors_middleware, cors_middleware(ctx.settings.cors_origins), metrics_middleware(ctx)]
    if ctx.settings.api_key:
        middlewares.append(auth_middleware(ctx.settings.api_key))
    # Bodies are streamed with our own cap; this only bounds what aiohttp itself buffers.
    app = web.Application(middlewares=middlewares, client_max_size=ctx.settings.max_file_size + 1_048_576)
    app[CONTEXT] = ctx
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/", index)
    legacy.add_routes(app)
    results.add_routes(app)

    async def close_fetcher(_app: web.Application) -> None:
        await ctx.fetcher.close()

    app.on_cleanup.append(close_fetcher)
    return app


__all__ = ["make_app", "make_probe_app"]
