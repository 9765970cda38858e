"""CaptionPipeline.submit(request) -> Future[CaptionResult]: the only way anything gets captioned.

Stages, each on its own threads so none blocks another:
  prepare (worker pool)   decode + hash + cache look-up + pixel preprocessing
  infer   (one thread)    micro-batched `generate`
  finish  (worker pool)   emoji mapping + store commit, then the future resolves

Identical work is done once: the store answers repeats, and an image already
in flight with the same settings is joined rather than captioned twice.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .batching import MicroBatcher
from .captioner.generate import Captioner
from .captioner.holder import ModelHolder
from .config import default
from .domain import (
    CaptionError,
    CaptionRequest,
    CaptionResult,
    EmojiMapping,
    GenerationSettings,
    ModelNotReady,
    Overloaded,
    PermanentError,
    Prediction,
    Source,
    TransientError,
)
from .emoji.mapper import EmojiMapper
from .imaging import DecodedImage, check_bytes, decode_image, make_thumbnail, sha256_of
from .metrics import Metrics
from .store.repository import CaptionRepository, ImageInfo, NewCaption, Sighting
from .store.rows import CaptionItem

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class PipelineLimits:
    max_file_size: int = default("max_file_size")
    max_image_pixels: int = default("max_image_pixels")
    batch_max_size: int = default("batch_max_size")
    batch_max_wait_s: float = default("batch_max_wait_ms") / 1000.0
    max_pending: int = default("max_pending")
    prepare_workers: int = field(default_factory=lambda: auto_prepare_workers(on_gpu=False))
    finish_workers: int = 2


def auto_prepare_workers(*, on_gpu: bool, cpus: int | None = None) -> int:
    """Threads that decode, hash, resize and thumbnail (PREPARE_WORKERS=0).

    They hold the GIL for 5-10 % of their time (bench/gil_cost.py), so they scale with cores.
    Beside a GPU the cores are otherwise idle, and a 12 MP photo costs ~130 ms of them (decode,
    exact resize, thumbnail): four threads would cap a GPU host near 30 such photos a second, so
    take all but two cores (the event loop and the inference thread). Beside a model on the CPU,
    torch wants the cores: at most four, half of them.
    """
    cpus = cpus or os.cpu_count() or 2
    if on_gpu:
        return max(2, min(32, cpus - 2))
    return max(2, min(4, cpus // 2))


@dataclass(frozen=True, slots=True)
class _Job:
    pixels: Any
    settings: GenerationSettings
    enqueued: float


class CaptionPipeline:
    def __init__(
        self,
        *,
        holder: ModelHolder,
        mapper: EmojiMapper,
        store: CaptionRepository | None,
        limits: PipelineLimits,
        metrics: Metrics | None = None,
    ) -> None:
        self.holder = holder
        self.mapper = mapper
        self.store = store
        self.limits = limits
        self.metrics = metrics or Metrics()
        self._slots = threading.BoundedSemaphore(limits.max_pending)
        # Bulk sources (watched folders, the queue, the CLI) wait for a slot and would take every
        # one that frees: during a folder import each HTTP request was refused as overloaded. A
        # quarter of the slots is theirs never; what HTTP leaves, they may take.
        self._bulk_slots = threading.BoundedSemaphore(limits.max_pending - interactive_reserve(limits.max_pending))
        self._pending = 0
        self._pending_lock = threading.Lock()
        self._idle = threading.Condition(self._pending_lock)
        self._inflight: dict[tuple[str, str], Future[list[str]]] = {}
        self._inflight_lock = threading.Lock()
        self._prepare = ThreadPoolExecutor(limits.prepare_workers, thread_name_prefix="prepare")
        self._finish = ThreadPoolExecutor(limits.finish_workers, thread_name_prefix="finish")
        self._batcher: MicroBatcher[_Job, list[str]] = MicroBatcher(
            self._infer,
            max_size=limits.batch_max_size,
            max_wait_s=limits.batch_max_wait_s,
            on_batch=self.metrics.observe_batch,
            incoming=lambda: self._on_its_way.count,
        )
        self._on_its_way = _OnItsWay()  # accepted, not yet queued for the model (looking up, decoding, resizing)
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._batcher.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Refuse new work, finish everything accepted, then stop the threads."""
        self._closed = True
        self.drain(timeout)
        self._batcher.stop(timeout)
        self._prepare.shutdown(wait=True)
        self._finish.shutdown(wait=True)

    def drain(self, timeout: float | None = None) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def model_name(self) -> str:
        return self.holder.captioner.name if self.holder.captioner else ""

    @property
    def framework(self) -> str:
        if self.holder.captioner is not None:
            return self.holder.captioner.loaded.framework
        return "BLIP2 (Bootstrapping Language-Image Pre-training v2)"

    # -- submit ---------------------------------------------------------------------------

    def submit(
        self, request: CaptionRequest, *, wait: bool = False, timeout: float | None = None
    ) -> Future[CaptionResult]:
        """Accept one image. Raises `ModelNotReady` or `Overloaded` (both transient) without
        accepting it; once this returns, the future always resolves: to a result (succeeded or
        failed) or to an exception that is a `TransientError` (retry) or a bug.

        `wait=True` blocks for a free slot instead of raising `Overloaded` (watcher, CLI).
        """
        captioner = self.ensure_ready()
        captioner.check_prompt(request.settings)
        bulk = not _interactive(request)
        if bulk and not self._bulk_slots.acquire(blocking=wait, timeout=timeout if wait else None):
            raise self._overloaded()
        if not self._slots.acquire(blocking=wait, timeout=timeout if wait else None):
            if bulk:
                self._bulk_slots.release()
            raise self._overloaded()
        with self._pending_lock:
            self._pending += 1
            self.metrics.pending.set(self._pending)
        outer: Future[CaptionResult] = Future()
        outer.add_done_callback(partial(self._release, bulk=bulk))
        started = time.perf_counter()
        arrived = self._on_its_way.expect()
        stage = partial(self._prepare_stage, request, captioner, outer, started, arrived)
        self._prepare.submit(self._guard, outer, _then, stage, arrived)
        return outer

    def ensure_ready(self) -> Captioner:
        """The captioner, or `ModelNotReady`/`Overloaded`: lets a door refuse before reading input."""
        if self._closed:
            raise Overloaded("The service is shutting down; retry on another instance", retry_after=5)
        captioner = self.holder.captioner
        if captioner is None:
            if self.holder.status == "failed":
                raise ModelNotReady(f"The model failed to load: {self.holder.error}", retry_after=60)
            if self.holder.status == "warming":
                raise ModelNotReady(
                    "The model is warming up (preparing its compiled decode step); retry in a few seconds",
                    retry_after=10,
                )
            raise ModelNotReady("The model is still loading; retry shortly", retry_after=10)
        return captioner

    def caption(self, request: CaptionRequest, timeout: float | None = None) -> CaptionResult:
        """Blocking convenience for scripts and tests: submit, waiting for a slot, and wait for the result."""
        return self.submit(request, wait=True).result(timeout)

    def _overloaded(self) -> Overloaded:
        return Overloaded(
            f"The service is overloaded ({self.limits.max_pending} images pending); retry shortly", retry_after=1
        )

    def _release(self, _future: Future[CaptionResult], *, bulk: bool) -> None:
        self._slots.release()
        if bulk:
            self._bulk_slots.release()
        with self._idle:
            self._pending -= 1
            self.metrics.pending.set(self._pending)
            if self._pending == 0:
                self._idle.notify_all()

    @staticmethod
    def _guard(outer: Future[CaptionResult], fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except BaseException as exc:
            if not outer.done():
                outer.set_exception(exc)
            if not isinstance(exc, CaptionError):
                log.exception("pipeline stage failed")

    # -- stages ---------------------------------------------------------------------------

    def _prepare_stage(
        self,
        request: CaptionRequest,
        captioner: Captioner,
        outer: Future[CaptionResult],
        started: float,
        arrived: Callable[[], None],
    ) -> None:
        model = captioner.name
        try:
            check_bytes(request.data, self.limits.max_file_size)
        except PermanentError as exc:
            self._fail(request, model, exc, outer, started)
            return
        # Looked up by the bytes' hash before decoding: a stored caption answers a repeat (a
        # re-scanned folder, a client sending the same photo again) without decoding it.
        sha = sha256_of(request.data)
        use_store = self.store is not None and request.store
        if use_store and not request.refresh:
            assert self.store is not None
            with self.metrics.stage("lookup"):
                stored = self.store.find_caption(sha, model, request.settings)
            if stored is not None and stored["status"] == "succeeded":
                self.store.record_sighting(ImageInfo(sha, len(request.data)), _sighting(request))
                self.metrics.cache_hits.labels(request.source.value).inc()
                outer.set_result(self._from_item(stored, started, cached=True))
                return
        try:
            with self.metrics.stage("decode"):
                decoded = decode_image(
                    request.data,
                    max_file_size=self.limits.max_file_size,
                    max_image_pixels=self.limits.max_image_pixels,
                    sha256=sha,
                )
        except PermanentError as exc:
            self._fail(request, model, exc, outer, started)
            return

        key = (decoded.sha256, request.settings.key())
        generation, leader = self._join_or_lead(key)
        if leader:
            try:
                with self.metrics.stage("preprocess"):
                    pixels = captioner.preprocess(decoded.image)
            except Exception as exc:
                generation.set_exception(exc)
            else:
                # No longer counted just before it is queued: counted a moment after, the batcher
                # that picks it up would wait a round for it, as if it were still coming.
                arrived()
                job = _Job(pixels, request.settings, time.perf_counter())
                inner = self._batcher.put(job, urgent=_interactive(request))
                inner.add_done_callback(lambda f: _chain(f, generation))
        # Queued (or joined to an image in flight): a batch no longer waits for this one, though
        # its thumbnail is still to be made.
        arrived()
        # The thumbnail is made here, while the image waits for the model, not after it.
        thumbnail = None
        if use_store:
            with self.metrics.stage("thumbnail"):
                thumbnail = make_thumbnail(decoded.image)
        generation.add_done_callback(
            lambda f: self._finish.submit(
                self._guard, outer, self._finish_stage, f, request, decoded, thumbnail, model, outer, started
            )
        )

    def _join_or_lead(self, key: tuple[str, str]) -> tuple[Future[list[str]], bool]:
        with self._inflight_lock:
            existing = self._inflight.get(key)
            if existing is not None:
                return existing, False
            future: Future[list[str]] = Future()
            self._inflight[key] = future

        def forget(_f: Future[list[str]]) -> None:
            with self._inflight_lock:
                self._inflight.pop(key, None)

        future.add_done_callback(forget)
        return future, True

    def _infer(self, jobs: Sequence[_Job]) -> Sequence[list[str] | BaseException]:
        captioner = self.holder.captioner
        assert captioner is not None
        begun = time.perf_counter()
        for job in jobs:
            self.metrics.stage_seconds.labels("wait").observe(begun - job.enqueued)
        results = captioner.caption_batch([j.pixels for j in jobs], [j.settings for j in jobs])
        took = time.perf_counter() - begun
        for _job in jobs:
            self.metrics.stage_seconds.labels("infer").observe(took)
        return results

    def _finish_stage(
        self,
        generation: Future[list[str]],
        request: CaptionRequest,
        decoded: DecodedImage,
        thumbnail: bytes | None,
        model: str,
        outer: Future[CaptionResult],
        started: float,
    ) -> None:
        exc = generation.exception()
        if exc is not None:
            log.error("captioning %s failed: %s", request.source_ref, exc)
            raise CaptionError(f"Captioning failed inside the model: {exc}", status=500) from exc
        texts = generation.result()
        with self.metrics.stage("emoji"):
            predictions = [Prediction(t, tuple(self.mapper.map(t))) for t in texts]
        elapsed = time.perf_counter() - started
        result = CaptionResult(
            status="succeeded",
            model=model,
            predictions=predictions,
            processing_time=elapsed,
            image_sha256=decoded.sha256,
        )
        if self.store is not None and request.store:
            image = ImageInfo(
                decoded.sha256,
                decoded.byte_size,
                decoded.width,
                decoded.height,
                decoded.format,
                thumbnail,
            )
            with self.metrics.stage("store"):
                item, created = self.store.save(
                    NewCaption(
                        image=image,
                        sighting=_sighting(request),
                        model=model,
                        settings=request.settings,
                        status="succeeded",
                        texts=texts,
                        emoji_mappings=[m.as_dict() for p in predictions[:1] for m in p.emoji_mappings],
                        error=None,
                        processing_time=elapsed,
                    ),
                    replace=request.refresh,
                )
            result.record_id = item["id"]
            if not created and not request.refresh and item["status"] == "succeeded":
                # Another worker stored it first: answer with what is stored, so every
                # caller sees the same caption for the same key.
                result = self._from_item(item, started, cached=True)
        self._observe(request, result, started)
        outer.set_result(result)

    def _fail(
        self,
        request: CaptionRequest,
        model: str,
        exc: PermanentError,
        outer: Future[CaptionResult],
        started: float,
    ) -> None:
        outer.set_result(self._store_failure(request, model, exc, started))

    def record_failure(self, request: CaptionRequest, exc: PermanentError) -> CaptionResult:
        """A request that failed before it could reach the model (a malformed message, a missing or
        refused file, a URL that could not be fetched): stored as `failed` with its reason, so
        nothing accepted vanishes without a record. `request.data` is what identifies it: the
        message body as received, or the file's bytes; empty means nothing to key it by (then it
        is reported, not stored). Raises TransientError when the store is down."""
        return self._store_failure(request, self.model_name, exc, time.perf_counter())

    def _store_failure(self, request: CaptionRequest, model: str, exc: PermanentError, started: float) -> CaptionResult:
        elapsed = time.perf_counter() - started
        sha = sha256_of(request.data) if request.data else None
        result = CaptionResult(
            status="failed",
            model=model,
            predictions=[],
            processing_time=elapsed,
            image_sha256=sha,
            error=exc.message,
            error_status=exc.status,
        )
        if sha is not None and self.store is not None and request.store:
            item, _ = self.store.save(
                NewCaption(
                    image=ImageInfo(sha, len(request.data)),
                    sighting=_sighting(request),
                    model=model,
                    settings=request.settings,
                    status="failed",
                    texts=[],
                    emoji_mappings=[],
                    error=exc.message,
                    processing_time=elapsed,
                )
            )
            result.record_id = item["id"]
        self._observe(request, result, started)
        return result

    def _from_item(self, item: CaptionItem, started: float, *, cached: bool) -> CaptionResult:
        """A result from a stored row: the first caption keeps the emojis stored with it."""
        texts = item["texts"] or [item["text"]]
        stored = tuple(EmojiMapping(m["emoji"], m["word"]) for m in item["emoji_mappings"])
        predictions = [Prediction(texts[0], stored)] + [Prediction(t, tuple(self.mapper.map(t))) for t in texts[1:]]
        return CaptionResult(
            status=item["status"],
            model=item["model"],
            predictions=predictions,
            processing_time=time.perf_counter() - started,
            image_sha256=item["image_sha256"],
            record_id=item["id"],
            cached=cached,
            error=item["error"],
        )

    def _observe(self, request: CaptionRequest, result: CaptionResult, started: float) -> None:
        self.metrics.captions.labels(request.source.value, result.status).inc()
        self.metrics.request_seconds.labels(request.source.value).observe(time.perf_counter() - started)


class _OnItsWay:
    """How many accepted images are still on their way to the batcher, which holds a batch only
    for these. An image stops counting the moment it is queued: its worker still makes the
    thumbnail after, and a batch must not wait for that."""

    def __init__(self) -> None:
        self._count = 0
        self._lock = threading.Lock()

    @property
    def count(self) -> int:
        return self._count

    def expect(self) -> Callable[[], None]:
        """Count one more; returns its `arrived()`, which uncounts it once however often it is called."""
        with self._lock:
            self._count += 1
        pending = True

        def arrived() -> None:
            nonlocal pending
            if pending:
                pending = False
                with self._lock:
                    self._count -= 1

        return arrived


def interactive_reserve(max_pending: int) -> int:
    """Slots of MAX_PENDING that only interactive requests may take: a quarter, at least one
    (none when there is only one)."""
    return max(1, max_pending // 4) if max_pending > 1 else 0


def _interactive(request: CaptionRequest) -> bool:
    """Someone waits on this answer now: its own slots, and the model's next batch."""
    return request.interactive or request.source is Source.HTTP


def _then(work: Callable[[], None], finally_: Callable[[], None]) -> None:
    """`work()`, then `finally_()` however it ended (an image stops counting as on its way)."""
    try:
        work()
    finally:
        finally_()


def _sighting(request: CaptionRequest) -> Sighting:
    return Sighting(request.source.value, request.source_ref, request.file_size, request.file_mtime)


def _chain(source: Future[list[str]], target: Future[list[str]]) -> None:
    exc = source.exception()
    if exc is not None:
        target.set_exception(exc)
    else:
        target.set_result(source.result())


__all__ = ["CaptionPipeline", "PipelineLimits", "TransientError", "auto_prepare_workers"]
