"""The HTTP API over a real socket (aiohttp test server) with the real tiny-random model and SQLite."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from PIL import Image

from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import ModelLoadError
from blip2_service.fetching import UrlFetcher
from blip2_service.intake import AddressPolicy, parse_networks

from ..conftest import image_bytes

Client = TestClient  # type: ignore[type-arg]
ClientFactory = Callable[..., Awaitable[Any]]


def _assert_legacy_error(body: dict[str, Any], fragment: str) -> None:
    assert body["service"] == "blip2" and body["status"] == "error" and body["predictions"] == []
    assert fragment in body["error"]["message"]
    assert isinstance(body["metadata"]["processing_time"], float)


def _assert_success(body: dict[str, Any]) -> None:
    assert body["service"] == "blip2" and body["status"] == "success"
    prediction = body["predictions"][0]
    assert isinstance(prediction["text"], str) and prediction["text"]
    for mapping in prediction["emoji_mappings"]:
        assert set(mapping) == {"emoji", "word"}
    assert body["metadata"]["model_info"]["framework"] == "BLIP2 (Bootstrapping Language-Image Pre-training v2)"
    assert round(body["metadata"]["processing_time"], 3) == body["metadata"]["processing_time"]


# -- success paths ----------------------------------------------------------------------------


async def test_multipart_upload_returns_the_legacy_body_and_is_stored(service: Any) -> None:
    client = await service()
    form = aiohttp.FormData()
    form.add_field("file", image_bytes(11), filename="photo.jpg", content_type="image/jpeg")
    resp = await client.post("/v3/analyze", data=form)
    assert resp.status == 200
    body = await resp.json()
    _assert_success(body)
    assert body["metadata"]["cached"] is False
    record = body["metadata"]["record_id"]
    # the same image again comes from the store
    resp2 = await client.post("/analyze", data=image_bytes(11), headers={"Content-Type": "image/jpeg"})
    body2 = await resp2.json()
    assert body2["metadata"]["cached"] is True and body2["metadata"]["record_id"] == record
    assert body2["predictions"][0]["text"] == body["predictions"][0]["text"]
    stored = await (await client.get(f"/captions/{record}")).json()
    assert stored["text"] == body["predictions"][0]["text"] and stored["source"] == "http"


async def test_caption_words_carry_emojis_in_caption_order(service: Any) -> None:
    client = await service()
    for seed in range(20, 30):  # tiny-random writes caption words; most captions map some
        resp = await client.post("/v3/analyze", data=image_bytes(seed), headers={"Content-Type": "image/png"})
        body = await resp.json()
        text = body["predictions"][0]["text"]
        mappings = body["predictions"][0]["emoji_mappings"]
        if mappings:
            positions = [text.replace("_", " ").find(m["word"].split("_")[0]) for m in mappings]
            assert positions == sorted(positions)
            assert len({m["word"] for m in mappings}) == len(mappings)
            return
    pytest.fail("no caption of ten had an emoji")


async def test_file_parameter_and_the_v2_routes(service: Any, roots: Path) -> None:
    client = await service()
    for url in (
        f"/v3/analyze?file={roots / 'a.jpg'}",
        f"/analyze?file={roots / 'sub' / 'b.png'}",
        f"/v2/analyze_file?file_path={roots / 'a.jpg'}",
    ):
        resp = await client.get(url)
        assert resp.status == 200, await resp.text()
        _assert_success(await resp.json())


async def test_url_parameter_fetches_when_private_urls_are_allowed(service: Any, images_site: TestServer) -> None:
    client = await service(allow_private_urls=True)
    for route in ("/v3/analyze?url=", "/v2/analyze?image_url="):
        resp = await client.get(route + str(images_site.make_url("/hop")))
        assert resp.status == 200, await resp.text()
        _assert_success(await resp.json())


async def test_prompt_num_captions_and_store_false(service: Any) -> None:
    client = await service()
    resp = await client.post(
        "/v3/analyze?num_captions=3&store=false&prompt=a+photo+of",
        data=image_bytes(12),
        headers={"Content-Type": "application/octet-stream"},
    )
    body = await resp.json()
    assert resp.status == 200
    assert len(body["predictions"]) == 3
    assert "record_id" not in body["metadata"]
    page = await (await client.get("/captions")).json()
    assert page["items"] == []


def _form(image: bytes, *fields: tuple[str, str], before: tuple[tuple[str, str], ...] = ()) -> aiohttp.FormData:
    form = aiohttp.FormData()
    for name, value in before:
        form.add_field(name, value)
    form.add_field("file", image, filename="photo.jpg", content_type="image/jpeg")
    for name, value in fields:
        form.add_field(name, value)
    return form


async def test_options_in_the_form_count_like_the_query_before_or_after_the_file(service: Any) -> None:
    """`curl -F file=@x.jpg -F prompt=...` had its prompt dropped without a word: a caption of
    something else than was asked. Fields that are not options are still skipped (legacy)."""
    client = await service()
    by_query = await (
        await client.post("/v3/analyze?prompt=a+photo+of&store=false", data=_form(image_bytes(13)))
    ).json()
    by_form = await (
        await client.post(
            "/v3/analyze",
            data=_form(image_bytes(13), ("prompt", "a photo of"), ("legacy_extra", "x"), before=(("store", "false"),)),
        )
    ).json()
    plain = await (await client.post("/v3/analyze?store=false", data=_form(image_bytes(13)))).json()
    assert by_form["predictions"] == by_query["predictions"] != plain["predictions"]
    assert "record_id" not in by_form["metadata"]  # store=false from the form, before the file
    three = await client.post("/v3/analyze?num_captions=3", data=_form(image_bytes(14), ("num_captions", "3")))
    assert three.status == 200 and len((await three.json())["predictions"]) == 3  # the same value twice: fine
    assert (await (await client.get("/captions")).json())["items"][0]["image_sha256"] == (
        (await three.json())["metadata"]["image_sha256"]
    )


@pytest.mark.parametrize(
    ("query", "fields", "fragment"),
    [
        ("?num_captions=2", (("num_captions", "3"),), "num_captions is given in the query ('2') and in the form ('3')"),
        ("", (("prompt", "a"), ("prompt", "b")), "The form gives prompt twice"),
        ("", (("num_captions", "9"),), "num_captions=9 is out of range"),
        ("", (("refresh", "perhaps"),), "refresh='perhaps' is not a boolean"),
        ("", (("prompt", "x" * 5000),), "The form field prompt is over 4096 bytes"),
        ("", (("prompt", "y" * 600),), "prompt is 600 characters"),
    ],
)
async def test_bad_options_in_the_form_are_400(service: Any, query: str, fields: Any, fragment: str) -> None:
    client = await service()
    resp = await client.post(f"/v3/analyze{query}", data=_form(image_bytes(15), *fields))
    assert resp.status == 400
    _assert_legacy_error(await resp.json(), fragment)
    assert (await (await client.get("/captions")).json())["items"] == []


# -- every error status -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "fragment"),
    [
        ("/v3/analyze", "Must provide either url or file parameter, or POST a file"),
        ("/v3/analyze?url=http://x/a.jpg&file=/a.jpg", "not both"),
        ("/v3/analyze?file=/x.jpg&num_captions=9", "num_captions=9 is out of range"),
        ("/v3/analyze?file=/x.jpg&num_captions=two", "not a whole number"),
        ("/v3/analyze?file=/x.jpg&store=perhaps", "store='perhaps' is not a boolean"),
        ("/v3/analyze?file=/x.jpg&prompt=a%00photo", "prompt holds a NUL"),
        ("/v3/analyze?url=ftp://example.com/a.jpg", "Only http:// and https://"),
        ("/v2/analyze", "Must provide either url or file"),
    ],
)
async def test_400_for_bad_or_missing_parameters(service: Any, url: str, fragment: str) -> None:
    client = await service()
    resp = await client.get(url)
    assert resp.status == 400
    _assert_legacy_error(await resp.json(), fragment)


async def test_401_without_or_with_a_wrong_api_key_but_health_stays_open(service: Any, roots: Path) -> None:
    client = await service(api_key="s3cret")
    url = f"/v3/analyze?file={roots / 'a.jpg'}"
    missing = await client.get(url)
    assert missing.status == 401
    _assert_legacy_error(await missing.json(), "Missing API key")
    wrong = await client.get(url, headers={"X-API-Key": "nope"})
    assert wrong.status == 401
    assert (await client.get(url, headers={"Authorization": "Bearer s3cret"})).status == 200
    assert (await client.get(url, headers={"X-API-Key": "s3cret"})).status == 200
    assert (await client.get("/captions")).status == 401
    assert (await client.get("/health")).status == 200
    assert (await client.get("/metrics")).status == 200


async def test_403_for_paths_outside_the_roots_symlinks_included(service: Any, roots: Path) -> None:
    client = await service()
    for path in ("/etc/passwd", str(roots / ".." / "secret.jpg"), str(roots / "escape.jpg")):
        resp = await client.get("/v3/analyze", params={"file": path})
        assert resp.status == 403, path
        _assert_legacy_error(await resp.json(), "outside the allowed folders")


async def test_403_for_internal_urls(service: Any) -> None:
    client = await service()
    for url in (
        "http://127.0.0.1:9/a.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]/a.jpg",
        "http://10.1.2.3/a.jpg",
        "http://localhost:9/a.jpg",
    ):
        resp = await client.get("/v3/analyze", params={"url": url})
        assert resp.status == 403, url
        _assert_legacy_error(await resp.json(), "ALLOW_PRIVATE_URLS=true")


async def test_403_for_a_redirect_to_an_internal_address(service: Any, images_site: TestServer) -> None:
    # 127.0.0.1 (the image site) is allowed here, 127.0.0.2 stands for an internal address.
    fetcher = UrlFetcher(
        timeout=5, max_bytes=10_000_000, policy=AddressPolicy(allow_networks=parse_networks(["127.0.0.1/32"]))
    )
    client = await service(fetcher=fetcher)
    ok = await client.get("/v3/analyze", params={"url": str(images_site.make_url("/img.jpg"))})
    assert ok.status == 200
    resp = await client.get("/v3/analyze", params={"url": str(images_site.make_url("/redirect"))})
    assert resp.status == 403
    _assert_legacy_error(await resp.json(), "127.0.0.2 is an internal address")


async def test_404_for_a_missing_file_inside_the_roots(service: Any, roots: Path) -> None:
    client = await service()
    resp = await client.get("/v3/analyze", params={"file": str(roots / "nope.jpg")})
    assert resp.status == 404
    _assert_legacy_error(await resp.json(), "File not found")


async def test_413_for_bodies_files_downloads_and_pixels_over_the_limits(
    service: Any, roots: Path, images_site: TestServer
) -> None:
    client = await service(max_file_size=200_000, max_image_pixels=1_000_000, allow_private_urls=True)
    big = os.urandom(300_000)
    resp = await client.post("/v3/analyze", data=big, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 413
    _assert_legacy_error(await resp.json(), "MAX_FILE_SIZE")
    (roots / "big.jpg").write_bytes(big)
    assert (await client.get("/v3/analyze", params={"file": str(roots / "big.jpg")})).status == 413
    resp = await client.get("/v3/analyze", params={"url": str(images_site.make_url("/huge"))})
    assert resp.status == 413
    flat = io.BytesIO()
    Image.new("RGB", (1500, 1000), (10, 200, 30)).save(flat, format="PNG")  # small file, 1.5 Mpx
    bomb = flat.getvalue()
    resp = await client.post("/v3/analyze", data=bomb, headers={"Content-Type": "image/png"})
    assert resp.status == 413
    _assert_legacy_error(await resp.json(), "MAX_IMAGE_PIXELS")


async def test_415_for_non_images_and_unsupported_content_types(service: Any) -> None:
    client = await service()
    resp = await client.post("/v3/analyze", data=b"just some text", headers={"Content-Type": "image/jpeg"})
    assert resp.status == 415
    _assert_legacy_error(await resp.json(), "Not a supported image")
    resp = await client.post("/v3/analyze", data=b"{}", headers={"Content-Type": "application/json"})
    assert resp.status == 415
    _assert_legacy_error(await resp.json(), "Content-Type application/json is not supported")


async def test_422_for_an_image_that_cannot_be_decoded(service: Any) -> None:
    client = await service()
    truncated = image_bytes(5, size=(300, 300))[:3000]
    resp = await client.post("/v3/analyze", data=truncated, headers={"Content-Type": "image/jpeg"})
    assert resp.status == 422
    body = await resp.json()
    _assert_legacy_error(body, "cannot be decoded")
    assert body["metadata"]["record_id"]  # recorded as failed, with its reason
    failed = await (await client.get("/captions?status=failed")).json()
    assert failed["items"][0]["error"] == body["error"]["message"]


async def test_502_when_the_url_cannot_be_fetched(service: Any, images_site: TestServer) -> None:
    client = await service(allow_private_urls=True, url_timeout=1)
    for path, fragment in (("/missing", "HTTP 404"), ("/slow", "timed out")):
        resp = await client.get("/v3/analyze", params={"url": str(images_site.make_url(path))})
        assert resp.status == 502
        _assert_legacy_error(await resp.json(), fragment)
    resp = await client.get("/v3/analyze", params={"url": "http://127.0.0.1:9/closed.jpg"})
    assert resp.status == 502


async def test_a_web_page_url_is_refused_saying_so_and_an_image_served_as_a_page_is_captioned(
    service: Any, images_site: TestServer
) -> None:
    client = await service(allow_private_urls=True)
    resp = await client.get("/v3/analyze", params={"url": str(images_site.make_url("/page"))})
    assert resp.status == 415
    _assert_legacy_error(await resp.json(), "is a web page (text/html), not an image; give the image's own URL")
    resp = await client.get("/v3/analyze", params={"url": str(images_site.make_url("/mislabelled.jpg"))})
    assert resp.status == 200


async def test_503_with_retry_after_while_loading_and_when_overloaded(
    service: Any, tiny_model: Any, roots: Path, loaded_holder: ModelHolder, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    def slow_load() -> Any:
        release.wait(30)
        return tiny_model

    loading = ModelHolder(slow_load)
    client = await service(holder=loading, load_wait_seconds=0)  # 0: answer at once, as before the wait
    health = await client.get("/health")
    assert health.status == 503
    assert (await health.json())["model_status"] == "loading"
    resp = await client.get("/v3/analyze", params={"file": str(roots / "a.jpg")})
    assert resp.status == 503 and int(resp.headers["Retry-After"]) >= 1
    _assert_legacy_error(await resp.json(), "still loading")
    release.set()

    # The first image is held inside the model (the real one, gated) so it is surely pending.
    in_model, proceed = threading.Event(), threading.Event()
    captioner = loaded_holder.captioner
    assert captioner is not None
    real_batch = captioner.caption_batch

    def gated(*args: Any, **kwargs: Any) -> Any:
        in_model.set()
        proceed.wait(30)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(captioner, "caption_batch", gated)
    busy = await service(max_pending=1, batch_max_size=8)
    first = asyncio.ensure_future(
        busy.post("/v3/analyze", data=image_bytes(40), headers={"Content-Type": "image/jpeg"})
    )
    assert await asyncio.get_running_loop().run_in_executor(None, in_model.wait, 30)
    second = await busy.post("/v3/analyze", data=image_bytes(41), headers={"Content-Type": "image/jpeg"})
    proceed.set()
    assert second.status == 503 and second.headers["Retry-After"] == "1"
    _assert_legacy_error(await second.json(), "overloaded")
    assert (await first).status == 200


async def test_health_reports_a_failed_model_with_what_to_do(service: Any) -> None:
    def fail() -> Any:
        raise ModelLoadError("Cannot load MODEL=x: not in the cache /c. Fix: set MODEL_DIR")

    holder = ModelHolder(fail)
    holder.start()
    holder.wait(10)
    client = await service(holder=holder)
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 503
    assert body["status"] == "unhealthy" and body["model_status"] == "failed"
    assert "MODEL_DIR" in body["error"]


async def test_health_when_loaded(service: Any) -> None:
    client = await service()
    resp = await client.get("/health")
    body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "healthy" and body["model_status"] == "loaded" and body["device"] == "cpu"


# -- cross-cutting ----------------------------------------------------------------------------


async def test_cors_headers_and_preflight(service: Any) -> None:
    client = await service(cors_origins="https://app.example")
    pre = await client.options(
        "/v3/analyze", headers={"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    )
    assert pre.status == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert "POST" in pre.headers["Access-Control-Allow-Methods"]
    other = await client.get("/health", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in other.headers
    star = await service(cors_origins="*")
    resp = await star.get("/health", headers={"Origin": "https://any.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "*"


async def test_metrics_openapi_and_unknown_routes(service: Any, roots: Path) -> None:
    client = await service()
    await client.get("/v3/analyze", params={"file": str(roots / "a.jpg")})
    metrics = await (await client.get("/metrics")).text()
    assert 'blip2_captions_total{source="http",status="succeeded"} 1.0' in metrics
    assert "blip2_batch_size_bucket" in metrics
    spec = await (await client.get("/openapi.json")).json()
    for path in (
        "/health",
        "/analyze",
        "/v3/analyze",
        "/v2/analyze",
        "/v2/analyze_file",
        "/captions",
        "/captions/{id}",
        "/images/{sha256}",
        "/metrics",
        "/openapi.json",
        "/",
    ):
        assert path in spec["paths"], path
    missing = await client.get("/nope")
    assert missing.status == 404 and "openapi.json" in (await missing.json())["error"]["message"]
    wrong = await client.delete("/v3/analyze")
    assert wrong.status == 405


def test_private_binds_loopback_only(settings_factory: Callable[..., Any]) -> None:
    assert settings_factory(private=True).host == "127.0.0.1"
    assert settings_factory(private=False).host == "0.0.0.0"


# -- requests that arrive while the model loads ------------------------------------------------------


async def test_a_request_sent_while_the_model_loads_waits_and_is_answered_200(
    service: Any, data_dir: Path, make_image: Callable[..., bytes]
) -> None:
    from blip2_service.captioner.loading import load_model

    def slow_load() -> Any:
        time.sleep(2.0)  # a real load that takes seconds, as a first download would take minutes
        return load_model("tiny-random", data_dir=data_dir, dtype="float32", device="cpu")

    holder = ModelHolder(slow_load)
    started = time.monotonic()
    client = await service(holder=holder)  # starts loading it in the background
    health = await client.get("/health")
    assert health.status == 503 and (await health.json())["model_status"] == "loading"  # /health does not wait
    resp = await client.post("/v3/analyze", data=make_image(701), headers={"Content-Type": "image/jpeg"})
    assert resp.status == 200, await resp.text()
    assert time.monotonic() - started >= 1.5  # it was held until the model was ready


async def test_requests_waiting_for_a_model_that_fails_get_503_with_the_reason(
    service: Any, make_image: Callable[..., bytes]
) -> None:
    def failing_load() -> Any:
        time.sleep(1.0)
        raise ModelLoadError("Cannot load MODEL=x: not in the cache /c. Fix: set MODEL_DIR")

    holder = ModelHolder(failing_load)
    client = await service(holder=holder)
    resp = await client.post("/v3/analyze", data=make_image(702), headers={"Content-Type": "image/jpeg"})
    body = await resp.json()
    assert resp.status == 503 and "MODEL_DIR" in body["error"]["message"] and "Retry-After" in resp.headers


async def test_load_wait_seconds_bounds_the_wait(service: Any, make_image: Callable[..., bytes]) -> None:
    release = threading.Event()

    def blocked() -> Any:
        release.wait(30)
        raise ModelLoadError("released by the test")

    holder = ModelHolder(blocked)
    client = await service(holder=holder, load_wait_seconds=0.5)
    try:
        resp = await client.post("/v3/analyze", data=make_image(703), headers={"Content-Type": "image/jpeg"})
        assert resp.status == 503 and "still loading" in (await resp.json())["error"]["message"]
    finally:
        release.set()


@pytest.mark.parametrize("model", ["tiny-random", "tiny-random-blip"])
async def test_a_prompt_too_long_for_the_models_room_gets_400_naming_the_limit(
    service: Any, data_dir: Path, make_image: Callable[..., bytes], model: str
) -> None:
    from blip2_service.captioner.loading import load_model

    loaded = load_model(model, data_dir=data_dir, dtype="float32", device="cpu")
    holder = ModelHolder(lambda: loaded)
    holder.load_now()
    client = await service(holder=holder, num_beams=1, max_new_tokens=8)
    room = holder.captioner.prompt_room(8)  # type: ignore[union-attr]
    assert room is not None and 0 < room < 500
    prompt = " ".join(["zq"] * 166)  # 497 characters, within the limit; past the positions of either model
    resp = await client.post(
        "/v3/analyze",
        params={"prompt": prompt, "refresh": "true"},
        data=make_image(801),
        headers={"Content-Type": "image/jpeg"},
    )
    body = await resp.json()
    assert resp.status == 400, body
    assert f"room for {room}" in body["error"]["message"] and "MAX_NEW_TOKENS=8" in body["error"]["message"]
    short = await client.post(
        "/v3/analyze", params={"prompt": "a photo of"}, data=make_image(802), headers={"Content-Type": "image/jpeg"}
    )
    assert short.status == 200


async def test_caption_again_over_http_404_409_and_200(
    service: Any, roots: Path, make_image: Callable[..., bytes]
) -> None:
    client = await service(num_beams=1, max_new_tokens=6)
    first = await client.get("/v3/analyze", params={"file": str(roots / "a.jpg")})
    sha = (await first.json())["metadata"]["image_sha256"]
    again = await client.post(f"/images/{sha}/caption")
    body = await again.json()
    assert again.status == 200 and body["status"] == "success" and body["metadata"]["image_sha256"] == sha
    assert (await client.post(f"/images/{'0' * 64}/caption")).status == 404
    uploaded = await client.post("/v3/analyze", data=make_image(990), headers={"Content-Type": "image/jpeg"})
    upload_sha = (await uploaded.json())["metadata"]["image_sha256"]
    gone = await client.post(f"/images/{upload_sha}/caption")  # seen only as an upload: no file to read
    assert gone.status == 409 and "No readable copy" in (await gone.json())["error"]["message"]
