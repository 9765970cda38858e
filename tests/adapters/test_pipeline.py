"""CaptionPipeline with the real tiny-random model and a real store (SQLite file and Postgres)."""

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select

from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import ModelLoadError
from blip2_service.domain import CaptionRequest, GenerationSettings, ModelNotReady, Overloaded, Source
from blip2_service.emoji.mapper import EmojiMapper
from blip2_service.pipeline import CaptionPipeline, PipelineLimits
from blip2_service.store import CaptionFilter, CaptionRepository
from blip2_service.store.tables import captions, sightings

from ..conftest import image_bytes

FAST = GenerationSettings(num_beams=1, max_new_tokens=6)


def _req(seed: int, ref: str | None = None, **kw: object) -> CaptionRequest:
    return CaptionRequest(Source.CLI, ref or f"/pics/{seed}.jpg", image_bytes(seed), FAST, **kw)  # type: ignore[arg-type]


def _count(store: CaptionRepository, table: object) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[arg-type]


def test_a_caption_is_stored_with_its_emojis_and_served_from_the_store_next_time(
    make_pipeline: Callable[..., CaptionPipeline], store: CaptionRepository
) -> None:
    pipeline = make_pipeline(store)
    first = pipeline.caption(_req(1), timeout=60)
    assert first.ok and not first.cached and first.record_id is not None
    assert first.text
    stored = store.get(first.record_id)
    assert stored is not None
    assert stored["text"] == first.text
    assert stored["emoji_mappings"] == [m.as_dict() for m in first.predictions[0].emoji_mappings]
    assert stored["source"] == "cli" and stored["status"] == "succeeded"

    decoded = pipeline.metrics.registry.get_sample_value("blip2_stage_seconds_count", {"stage": "decode"})
    again = pipeline.caption(_req(1, ref="/elsewhere/copy.jpg"), timeout=60)
    assert again.cached and again.record_id == first.record_id and again.text == first.text
    # Answered by the bytes' hash: the repeat was never decoded.
    assert pipeline.metrics.registry.get_sample_value("blip2_stage_seconds_count", {"stage": "decode"}) == decoded == 1
    image = store.image(first.image_sha256 or "")
    assert image is not None
    assert {loc["source_ref"] for loc in image["locations"]} == {"/pics/1.jpg", "/elsewhere/copy.jpg"}
    assert len(image["captions"]) == 1


def test_a_lone_image_is_not_held_for_company(
    make_pipeline: Callable[..., CaptionPipeline], sqlite_store: CaptionRepository
) -> None:
    """BATCH_MAX_WAIT_MS is for images on their way; one image alone goes to the model at once
    (its thumbnail, made after it is queued, does not hold it either). A minute's wait would time out."""
    pipeline = make_pipeline(sqlite_store, batch_max_wait_s=60.0)
    for seed in (41, 42):
        assert pipeline.caption(_req(seed), timeout=30).ok


def test_store_false_neither_reads_nor_writes(
    make_pipeline: Callable[..., CaptionPipeline], sqlite_store: CaptionRepository
) -> None:
    pipeline = make_pipeline(sqlite_store)
    result = pipeline.caption(_req(2, store=False), timeout=60)
    assert result.ok and result.record_id is None
    assert _count(sqlite_store, captions) == 0


def test_refresh_captions_again_and_replaces_the_stored_row(
    make_pipeline: Callable[..., CaptionPipeline], sqlite_store: CaptionRepository
) -> None:
    pipeline = make_pipeline(sqlite_store)
    first = pipeline.caption(_req(3), timeout=60)
    again = pipeline.caption(_req(3, refresh=True), timeout=60)
    assert not again.cached and again.record_id == first.record_id
    assert _count(sqlite_store, captions) == 1


def test_undecodable_image_is_stored_as_failed_with_the_reason(
    make_pipeline: Callable[..., CaptionPipeline], store: CaptionRepository
) -> None:
    pipeline = make_pipeline(store)
    broken = image_bytes(4, size=(300, 300))[:2000]
    result = pipeline.caption(CaptionRequest(Source.WATCH, "/in/broken.jpg", broken, FAST), timeout=60)
    assert result.status == "failed" and result.error_status == 422
    item = store.get(result.record_id or -1)
    assert item is not None and item["status"] == "failed"
    assert "cannot be decoded" in (item["error"] or "")
    failed, _ = store.query(CaptionFilter(status="failed"))
    assert [i["id"] for i in failed] == [result.record_id]


def test_eight_threads_submitting_the_same_fifty_images_leave_fifty_captions(
    make_pipeline: Callable[..., CaptionPipeline], store: CaptionRepository
) -> None:
    pipeline = make_pipeline(store, max_pending=512, batch_max_size=16)
    barrier = threading.Barrier(8)

    def worker(thread: int) -> list[int]:
        barrier.wait()
        futures = [pipeline.submit(_req(100 + i, ref=f"/t{thread}/{i}.jpg"), wait=True) for i in range(50)]
        return [f.result(300).record_id for f in futures]  # type: ignore[misc]

    with ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(worker, range(8)))
    assert _count(store, captions) == 50
    assert _count(store, sightings) == 400  # every place each image was seen
    for i in range(50):  # every thread got the same record for the same image
        assert len({ids[t][i] for t in range(8)}) == 1


def test_identical_in_flight_work_is_done_once(
    make_pipeline: Callable[..., CaptionPipeline], sqlite_store: CaptionRepository
) -> None:
    pipeline = make_pipeline(sqlite_store)
    futures = [pipeline.submit(_req(5, ref=f"/dup/{i}.jpg")) for i in range(6)]
    results = [f.result(60) for f in futures]
    assert len({r.record_id for r in results}) == 1
    assert sum(1 for r in results if not r.cached) == 1
    assert pipeline.metrics.batch_size._sum.get() == 1.0  # one image went through the model


def test_a_full_queue_refuses_with_overloaded_and_nothing_accepted_is_lost(
    make_pipeline: Callable[..., CaptionPipeline],
) -> None:
    pipeline = make_pipeline(None, max_pending=3, batch_max_size=1)
    accepted, refused = [], 0
    for i in range(12):
        try:
            accepted.append(pipeline.submit(_req(200 + i)))
        except Overloaded as exc:
            refused += 1
            assert exc.status == 503 and exc.retry_after >= 1
    assert refused > 0
    assert all(f.result(60).ok for f in accepted)


def test_a_model_that_is_loading_or_failed_refuses_with_model_not_ready(mapper: EmojiMapper) -> None:
    def fail() -> None:
        raise ModelLoadError("no weights here; set MODEL")

    holder = ModelHolder(fail)  # type: ignore[arg-type]
    pipeline = CaptionPipeline(holder=holder, mapper=mapper, store=None, limits=PipelineLimits())
    with pytest.raises(ModelNotReady, match="still loading"):
        pipeline.submit(_req(1))
    holder.start()
    holder.wait(10)
    with pytest.raises(ModelNotReady, match="no weights here"):
        pipeline.submit(_req(1))


def test_a_folder_import_leaves_an_http_request_its_slots_and_the_next_batch(
    make_pipeline: Callable[..., CaptionPipeline],
) -> None:
    """A watcher (or the queue) waits for a slot and took every one that freed: during an import,
    each HTTP request was refused as overloaded, and one accepted waited behind the whole backlog."""
    from concurrent.futures import Future

    from blip2_service.domain import CaptionResult

    from ..conftest import wait_until

    pipeline = make_pipeline(None, max_pending=8, batch_max_size=2)
    slow = GenerationSettings(num_beams=5, max_new_tokens=40, min_new_tokens=40)
    bulk: list[Future[CaptionResult]] = []
    stop = threading.Event()

    def folder_import() -> None:
        for i in range(200):
            if stop.is_set():
                return
            request = CaptionRequest(Source.WATCH, f"f{i}", image_bytes(3000 + i), slow)
            bulk.append(pipeline.submit(request, wait=True))

    feeder = threading.Thread(target=folder_import)
    feeder.start()
    try:
        wait_until(lambda: pipeline.pending >= 6, 60, "the import to fill its share of the slots")
        for i in range(3):
            upload = CaptionRequest(Source.HTTP, "upload", image_bytes(900 + i), slow)
            answer = pipeline.submit(upload)  # not Overloaded
            assert answer.result(120).status == "succeeded"
            assert feeder.is_alive(), "the import finished first: the test showed nothing"
        assert pipeline.pending <= 8
    finally:
        stop.set()
        feeder.join(120)
    assert all(f.result(120).status == "succeeded" for f in bulk)
