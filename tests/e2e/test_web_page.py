"""The web page in a real browser (Debian's Chromium driven by Playwright) against a real server."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from blip2_service.captioner.holder import ModelHolder
from blip2_service.domain import CaptionRequest, GenerationSettings, Source
from blip2_service.runtime import Runtime

from ..conftest import IN_CI, image_bytes

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _serve(runtime: Runtime) -> Iterator[str]:
    """Serve a started runtime's HTTP on a real port from a background event loop."""
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
    yield f"http://127.0.0.1:{holder['port']}"
    asyncio.run_coroutine_threadsafe(holder["runner"].cleanup(), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    runtime.stop()


@pytest.fixture
def served(
    settings_factory: Callable[..., Any], loaded_holder: ModelHolder, tmp_path: Path
) -> Iterator[tuple[str, Runtime]]:
    """A runtime with the loaded tiny model, FILE_ROOTS a folder of the test's, over a real port."""
    (tmp_path / "photos").mkdir()
    runtime = Runtime(settings_factory(file_roots=str(tmp_path / "photos")), holder=loaded_holder)
    runtime.start()
    yield from ((url, runtime) for url in _serve(runtime))


SHOTS = Path(os.environ.get("SCREENSHOT_DIR", "test-artifacts/screenshots"))


@contextmanager
def _browser() -> Iterator[Any]:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("Chromium is not installed (apt-get install chromium); CI=true requires it", pytrace=False)
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

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
        try:
            yield browser
        finally:
            browser.close()


def _shot(page: Any, name: str) -> None:
    """A screenshot for a person to look at (not committed: test-artifacts/ is ignored)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _caption(runtime: Runtime, seed: int) -> str:
    settings = GenerationSettings(num_beams=1, max_new_tokens=8)
    result = runtime.pipeline.caption(CaptionRequest(Source.CLI, f"/photos/{seed}.jpg", image_bytes(seed), settings))
    assert result.ok
    return result.text


@pytest.mark.browser
def test_the_page_lists_searches_and_updates_live(served: tuple[str, Runtime]) -> None:
    url, runtime = served
    texts = [_caption(runtime, seed) for seed in range(3)]
    with _browser() as browser:
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
        _shot(page, "search")

        # an emoji on a card is a search for it: every card left holds that emoji, the clicked one too
        page.fill("#q", "")
        page.wait_for_function("n => document.querySelectorAll('article.card').length === n", arg=4, timeout=10000)
        button = page.locator("article.card .emoji").first
        emoji = button.inner_text()
        button.click()
        assert page.input_value("#q") == emoji
        page.wait_for_function(
            """e => {
                const cards = [...document.querySelectorAll('article.card')];
                const holds = c => [...c.querySelectorAll('.emoji')].some(b => b.textContent === e);
                return cards.length > 0 && cards.every(holds);
            }""",
            arg=emoji,
            timeout=10000,
        )
        assert not page.locator("dialog[open]").count()  # the click searched; it did not open the card


def _stored_file(runtime: Runtime, folder: Path, seed: int) -> str:
    """An image kept as a file inside FILE_ROOTS and captioned from it (so it can be captioned again)."""
    path = folder / f"{seed}.jpg"
    path.write_bytes(image_bytes(seed))
    settings = GenerationSettings(num_beams=1, max_new_tokens=8)
    result = runtime.pipeline.caption(CaptionRequest(Source.CLI, str(path), path.read_bytes(), settings))
    assert result.ok and result.image_sha256
    return result.image_sha256


@pytest.mark.browser
def test_empty_states_detail_view_caption_again_load_more_filters_and_upload(
    served: tuple[str, Runtime], tmp_path: Path
) -> None:
    url, runtime = served
    with _browser() as browser:
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_selector(".empty")
        assert "No captions yet" in page.locator(".empty").inner_text()
        page.wait_for_function("() => document.getElementById('model-state').textContent.includes('tiny-random')")
        _shot(page, "empty")

        # upload through the file picker: the answer is shown and a new card appears
        picture = tmp_path / "upload.jpg"
        picture.write_bytes(image_bytes(4242))
        page.set_input_files("#file", str(picture))
        page.wait_for_function("() => document.getElementById('drop-result').textContent.startsWith('upload.jpg: ')")
        page.wait_for_selector("article.card")
        assert "upload.jpg" in page.locator("article.card .meta").first.inner_text()

        # a failed item: a placeholder, not a broken image
        bad = runtime.pipeline.caption(
            CaptionRequest(Source.CLI, "/nowhere/bad.jpg", b"\xff\xd8\xff\xe0 not really a jpeg", GenerationSettings())
        )
        assert not bad.ok
        page.wait_for_selector("article.card.failed .placeholder", timeout=15000)
        assert page.locator("article.card.failed img").count() == 0

        # filters: status and source; a search with no hits has its own empty state
        page.select_option("#status-filter", "failed")
        page.wait_for_function("() => document.querySelectorAll('article.card').length === 1")
        assert page.locator("article.card.failed").count() == 1
        page.select_option("#status-filter", "")
        page.select_option("#source", "http")
        page.wait_for_function(
            "() => [...document.querySelectorAll('article.card .meta')].every(m => m.textContent.startsWith('http'))"
        )
        page.select_option("#source", "")
        page.fill("#q", "zzzznothing")
        page.wait_for_function(
            "() => (document.querySelector('.empty') || {}).textContent?.includes('No captions match')"
        )
        _shot(page, "no-match")
        page.fill("#q", "")

        # load more through the cursor: 26 more captions, 24 a page
        for seed in range(500, 526):
            _stored_file(runtime, tmp_path / "photos", seed)
        page.reload()
        page.wait_for_selector("#more:not([hidden])")
        assert page.locator("article.card").count() == 24
        page.click("#more")
        page.wait_for_function("() => document.querySelectorAll('article.card').length === 28")
        _shot(page, "grid")

        # the detail view: every caption with its model and settings, every sighting, and caption again
        page.locator("article.card").first.click()
        page.wait_for_selector("dialog[open] table.captions tr:nth-child(2)")
        assert "tiny-random" in page.locator("dialog table.captions").inner_text()
        assert page.locator("dialog table.sightings tr").count() >= 2
        assert str(tmp_path / "photos") in page.locator("dialog table.sightings").inner_text()
        page.click("#again")
        page.wait_for_function("() => document.getElementById('again-result').textContent.startsWith('new caption: ')")
        _shot(page, "detail")


@pytest.mark.browser
def test_the_status_bar_says_when_the_model_failed(settings_factory: Callable[..., Any], tmp_path: Path) -> None:
    from blip2_service.captioner.loading import ModelLoadError

    def fail() -> Any:
        raise ModelLoadError("Cannot load MODEL=x: not in the cache /c. Fix: hf download x")

    holder = ModelHolder(fail)
    runtime = Runtime(settings_factory(), holder=holder)
    runtime.start()
    holder.wait(10)
    for url in _serve(runtime):
        with _browser() as browser:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_function(
                "() => document.getElementById('model-state').textContent.startsWith('model failed to load: ')"
            )
            assert "hf download" in page.locator("#model-state").inner_text()
            assert page.locator("#model-state.bad").count() == 1
            _shot(page, "model-failed")
