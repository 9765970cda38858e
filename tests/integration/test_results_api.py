"""Stored-results routes over real HTTP, on SQLite and on Postgres."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from blip2_service.captioner.holder import ModelHolder
from blip2_service.http_api.app import make_app
from blip2_service.runtime import Runtime

from ..conftest import image_bytes


@pytest.fixture
async def client(
    aiohttp_client: Callable[..., Awaitable[Any]],
    settings_factory: Callable[..., Any],
    loaded_holder: ModelHolder,
    db_url: str,
) -> AsyncIterator[Any]:
    runtime = Runtime(settings_factory(database_url=db_url), holder=loaded_holder)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.start)
    yield await aiohttp_client(make_app(runtime.http_context()))
    await loop.run_in_executor(None, runtime.stop)


async def _analyze(client: Any, seed: int, **params: str) -> dict[str, Any]:
    resp = await client.post(
        "/v3/analyze", data=image_bytes(seed), headers={"Content-Type": "image/jpeg"}, params=params
    )
    return dict(await resp.json())


async def test_captions_list_get_and_image(client: Any) -> None:
    bodies = [await _analyze(client, seed) for seed in range(5)]
    bad = await client.post(
        "/v3/analyze", data=image_bytes(9, size=(200, 200))[:1500], headers={"Content-Type": "image/jpeg"}
    )
    assert bad.status == 422
    page = await (await client.get("/captions")).json()
    assert len(page["items"]) == 6 and page["next_cursor"] is None
    newest = page["items"][0]
    assert newest["status"] == "failed" and "decoded" in newest["error"]
    item = page["items"][1]
    for key in (
        "id",
        "image_sha256",
        "source",
        "source_ref",
        "model",
        "text",
        "emoji_mappings",
        "status",
        "error",
        "processing_time",
        "created_at",
    ):
        assert key in item
    assert item["source"] == "http" and item["model"] == "tiny-random"
    assert item["text"] == bodies[-1]["predictions"][0]["text"]

    one = await client.get(f"/captions/{item['id']}")
    assert one.status == 200 and (await one.json())["id"] == item["id"]
    assert (await client.get("/captions/999999")).status == 404
    assert (await client.get("/captions/abc")).status == 400

    image = await (await client.get(f"/images/{item['image_sha256']}")).json()
    assert image["captions"][0]["id"] == item["id"]
    assert image["locations"][0]["source"] == "http"
    assert image["width"] == 96 and image["format"] == "JPEG"
    thumb = await client.get(f"/images/{item['image_sha256']}/thumbnail")
    assert thumb.status == 200 and thumb.content_type == "image/jpeg"
    assert (await client.get(f"/images/{'0' * 64}")).status == 404
    assert (await client.get("/images/not-a-hash")).status == 400


async def test_paging_filters_and_search(client: Any) -> None:
    for seed in range(7):
        await _analyze(client, seed)
    seen: list[int] = []
    cursor = None
    while True:
        params = {"limit": "3", **({"cursor": cursor} if cursor else {})}
        page = await (await client.get("/captions", params=params)).json()
        seen += [i["id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == len(set(seen)) == 7 and seen == sorted(seen, reverse=True)

    assert len((await (await client.get("/captions?source=http")).json())["items"]) == 7
    assert (await (await client.get("/captions?source=queue")).json())["items"] == []
    assert len((await (await client.get("/captions?model=tiny-random&status=succeeded")).json())["items"]) == 7
    everything = await (await client.get("/captions?since=2000-01-01T00:00:00Z&until=2999-01-01")).json()
    assert len(everything["items"]) == 7

    # search for a word of one stored caption finds it
    first = (await (await client.get("/captions?limit=1")).json())["items"][0]
    word = max(first["text"].split(), key=len)
    found = await (await client.get("/captions", params={"q": word})).json()
    assert first["id"] in [i["id"] for i in found["items"]]
    assert all(word in i["text"] or word in " ".join(m["word"] for m in i["emoji_mappings"]) for i in found["items"])

    # an emoji as the page shows it finds the captions whose emojis hold it, with or without U+FE0F
    def bare(glyph: str) -> str:
        return glyph.replace("\ufe0f", "")

    items = (await (await client.get("/captions")).json())["items"]
    mapped = next(i for i in items if i["emoji_mappings"])
    glyph = mapped["emoji_mappings"][0]["emoji"]
    for spelling in {glyph, bare(glyph), bare(glyph) + "\ufe0f"}:
        by_emoji = (await (await client.get("/captions", params={"q": spelling})).json())["items"]
        assert mapped["id"] in [i["id"] for i in by_emoji]
        assert all(bare(glyph) in [bare(m["emoji"]) for m in i["emoji_mappings"]] for i in by_emoji)
    # with a word, both must hold; an emoji no caption has finds nothing (not everything)
    word = max(mapped["text"].split(), key=len)
    both = (await (await client.get("/captions", params={"q": f"{glyph} {word}"})).json())["items"]
    assert mapped["id"] in [i["id"] for i in both]
    assert (await (await client.get("/captions", params={"q": "♜"})).json())["items"] == []


@pytest.mark.parametrize(
    ("query", "fragment"),
    [
        ("limit=0", "limit=0 is out of range"),
        ("limit=1000", "out of range"),
        ("limit=ten", "not a whole number"),
        ("source=email", "source='email' is not one of"),
        ("status=done", "status='done' is not one of"),
        ("since=yesterday", "since='yesterday' is not an ISO 8601 time"),
        ("cursor=garbage!!", "cursor is not valid"),
    ],
)
async def test_bad_filters_are_400_with_a_clear_message(client: Any, query: str, fragment: str) -> None:
    resp = await client.get(f"/captions?{query}")
    assert resp.status == 400
    assert fragment in (await resp.json())["error"]["message"]


async def test_a_wide_gamut_photo_is_captioned_and_shown_as_the_same_picture_in_srgb(client: Any) -> None:
    """A Display P3 photo (an iPhone's) and the same picture saved in sRGB: one caption, one
    thumbnail colour. Read without its profile the P3 one was washed out, for the model and on
    the page."""
    from PIL import Image

    from ..icc_profiles import P3_ORANGE, P3_ORANGE_IN_SRGB, display_p3

    def png(colour: tuple[int, int, int], **extra: Any) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (640, 480), colour).save(out, "PNG", **extra)
        return out.getvalue()

    bodies = []
    for data in (png(P3_ORANGE, icc_profile=display_p3()), png(P3_ORANGE_IN_SRGB)):
        resp = await client.post("/v3/analyze", data=data, headers={"Content-Type": "image/png"})
        assert resp.status == 200
        bodies.append(await resp.json())
    wide, srgb = bodies
    assert wide["predictions"] == srgb["predictions"]
    thumb = await client.get(f"/images/{wide['metadata']['image_sha256']}/thumbnail")
    pixel = Image.open(io.BytesIO(await thumb.read())).getpixel((120, 90))
    assert isinstance(pixel, tuple) and all(abs(a - b) <= 3 for a, b in zip(pixel, P3_ORANGE_IN_SRGB, strict=True))
