"""The web page in a real browser (Debian's Chromium driven by Playwright) against a real server."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aiohttp import web

from blip2_service.captioner.holder import ModelHolder
from blip2_service.domain import CaptionRequest, GenerationSettings, Source
from blip2_service.runtime import Runtime

from ..conftest import IN_CI, image_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture
def served(settings_factory: Callable[..., Any], loaded_holder: ModelHolder) -> Iterator[tuple[str, Runtime]]:
    """A runtime serving HTTP on a real port from a background event loop."""
    runtime = Runtime(settings_factory(), holder=loaded_holder)
    runtime.start()
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict[str, Any] = {}

    async def run() -> None:
        runner = web.AppRunner(runtime.make_app())
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        holder["runner"] = runner
        holder["port"] = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        started.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(run()), loop.run_forever()), daemon=True)
    thread.start()
    started.wait(30)
    yield f"http://127.0.0.1:{holder['port']}", runtime
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    runtime.stop()


def _caption(runtime: Runtime, seed: int) -> str:
    settings = GenerationSettings(num_beams=1, max_new_tokens=8)
    result = runtime.pipeline.caption(CaptionRequest(Source.CLI, f"/photos/{seed}.jpg", image_bytes(seed), settings))
    assert result.ok
    return result.text


@pytest.mark.browser
def test_the_page_lists_searches_and_updates_live(served: tuple[str, Runtime]) -> None:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("Chromium is not installed (apt-get install chromium); CI=true requires it", pytrace=False)
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    url, runtime = served
    texts = [_caption(runtime, seed) for seed in range(3)]
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
                "--disable-sync",
                "--disable-quic",
            ],
        )
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector("article.card")
        assert page.locator("article.card").count() == 3
        shown = page.locator("article.card .text").all_inner_texts()
        assert shown == list(reversed(texts))  # newest first
        # thumbnails really load (the browser decoded the JPEG)
        page.wait_for_function("() => [...document.images].every(i => i.complete && i.naturalWidth > 0)")

        # live updates: a caption stored after the page loaded appears without a reload
        new_text = _caption(runtime, 99)
        page.wait_for_function("n => document.querySelectorAll('article.card').length === n", arg=4, timeout=15000)
        assert page.locator("article.card .text").first.inner_text() == new_text

        # search: a word of one caption narrows the grid to captions containing it
        word = max(texts[0].split(), key=len)
        page.fill("#q", word)
        page.wait_for_function(
            "w => [...document.querySelectorAll('article.card .text')].every(e => e.textContent.includes(w))",
            arg=word,
            timeout=10000,
        )
        assert page.locator("article.card").count() >= 1
        browser.close()
