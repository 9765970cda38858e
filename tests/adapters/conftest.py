"""Fixtures shared by the adapter tests: a service over a real socket, local files, an image site."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from blip2_service.captioner.holder import ModelHolder
from blip2_service.fetching import UrlFetcher
from blip2_service.http_api.app import make_app
from blip2_service.runtime import Runtime

from ..conftest import image_bytes

Client = TestClient  # type: ignore[type-arg]
ClientFactory = Callable[..., Awaitable[Any]]


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes(1))
    (folder / "sub").mkdir()
    (folder / "sub" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(3))
    os.symlink(secret, folder / "escape.jpg")
    return folder


@pytest.fixture
async def service(
    aiohttp_client: ClientFactory, settings_factory: Callable[..., Any], loaded_holder: ModelHolder, roots: Path
) -> AsyncIterator[Callable[..., Awaitable[Client]]]:
    runtimes: list[Runtime] = []

    async def start(
        holder: ModelHolder | None = loaded_holder, fetcher: UrlFetcher | None = None, **overrides: Any
    ) -> Client:
        overrides.setdefault("file_roots", str(roots))
        runtime = Runtime(settings_factory(**overrides), holder=holder)
        await asyncio.get_running_loop().run_in_executor(None, runtime.start)
        runtimes.append(runtime)
        ctx = runtime.http_context()
        if fetcher is not None:
            ctx.fetcher = fetcher
        client: Client = await aiohttp_client(make_app(ctx))
        client.runtime = runtime  # type: ignore[attr-defined]
        return client

    yield start
    for runtime in runtimes:
        await asyncio.get_running_loop().run_in_executor(None, runtime.stop)


@pytest.fixture
async def images_site(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> TestServer:
    """A real HTTP server that serves images, errors and redirects for ?url= tests."""

    async def jpg(_r: web.Request) -> web.Response:
        return web.Response(body=image_bytes(7), content_type="image/jpeg")

    async def huge(_r: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        await resp.prepare(_r)
        for _ in range(40):
            await resp.write(b"\xff" * 65536)
        return resp

    async def to_forbidden(_r: web.Request) -> web.Response:
        raise web.HTTPFound(f"http://127.0.0.2:{_r.url.port}/img.jpg")

    async def slow(_r: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(body=b"late")

    async def hop(_r: web.Request) -> web.Response:
        raise web.HTTPFound("/img.jpg")

    async def text(_r: web.Request) -> web.Response:
        return web.Response(text="hello")

    async def page(_r: web.Request) -> web.Response:
        return web.Response(text="\n<!DOCTYPE html><html><img src='/img.jpg'></html>", content_type="text/html")

    async def mislabelled(_r: web.Request) -> web.Response:  # an image a careless server calls a page
        return web.Response(body=image_bytes(7), content_type="text/html")

    app = web.Application()
    app.router.add_get("/img.jpg", jpg)
    app.router.add_get("/huge", huge)
    app.router.add_get("/redirect", to_forbidden)
    app.router.add_get("/hop", hop)
    app.router.add_get("/slow", slow)
    app.router.add_get("/text", text)
    app.router.add_get("/page", page)
    app.router.add_get("/mislabelled.jpg", mislabelled)
    return await aiohttp_server(app)
