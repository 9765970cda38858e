"""Watched folders: a thin watchdog adapter over the pipeline.

Filesystem events only say "look at this path"; a file is read once its size
and mtime have held still for WATCH_SETTLE_SECONDS (the `StabilityTracker`),
because `created` fires before the writer has written anything. On start the
folders are scanned and every file whose (path, size, mtime) the store does
not already know is captioned, so downtime loses nothing and a restart over
100,000 stored files costs one query and a directory walk, not 100,000 hashes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from .config import Settings, default
from .domain import (
    CaptionError,
    CaptionRequest,
    CaptionResult,
    Forbidden,
    GenerationSettings,
    NotFound,
    PermanentError,
    Source,
    TransientError,
    utf8_text,
)
from .imaging import IMAGE_SUFFIXES
from .intake import read_path
from .metrics import Metrics
from .pipeline import CaptionPipeline
from .retry import WORK, Backoff
from .store.repository import CaptionRepository

log = logging.getLogger(__name__)

TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", ".partial", ".download", "~")
Publish = Callable[[dict[str, Any]], None]
StatFn = Callable[[Path], tuple[int, float] | None]
FOLDER_CHECK_SECONDS = 1.0  # how often each watched folder's identity is checked (one stat)
_SKIPPED_REMEMBERED = 10_000  # skipped paths remembered, so each is counted once
_SYMLINK_SKIPPED = "skipping %s: %s (set WATCH_FOLLOW_SYMLINKS=true to follow it)"


def is_temporary(path: Path) -> bool:
    """Names writers use while a file is incomplete: ignored until renamed to a real name."""
    name = path.name
    return name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES)


def is_image_name(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _identity(folder: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder, or None when it is not there: changes when it is replaced."""
    try:
        st = folder.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


def _stat(path: Path) -> tuple[int, float] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime


@dataclass(slots=True)
class _Observation:
    size: int
    mtime: float
    since: float


class StabilityTracker:
    """Which touched files have stopped changing. Pure logic over an injected clock and stat."""

    def __init__(
        self,
        settle_seconds: float,
        *,
        clock: Callable[[], float] = time.time,
        stat: StatFn = _stat,
    ) -> None:
        self.settle = settle_seconds
        self._clock = clock
        self._stat = stat
        self._files: dict[Path, _Observation | None] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._files)

    def touch(self, path: Path) -> None:
        """Something happened to `path`: (re)start watching it."""
        with self._lock:
            self._files[path] = None

    def forget(self, path: Path) -> None:
        with self._lock:
            self._files.pop(path, None)

    def due(self) -> list[tuple[Path, int, float]]:
        """Files unchanged for `settle` seconds, as (path, size, mtime); they stop being tracked.

        A file whose mtime is already older than the settle time counts as stable
        on first sight (catch-up of files that were complete before we started).
        """
        now = self._clock()
        ready: list[tuple[Path, int, float]] = []
        with self._lock:
            for path, seen in list(self._files.items()):
                current = self._stat(path)
                if current is None:  # vanished (deleted or renamed away)
                    del self._files[path]
                    continue
                size, mtime = current
                if seen is None or (seen.size, seen.mtime) != (size, mtime):
                    since = now if seen is not None or now - mtime < self.settle else now - self.settle
                    self._files[path] = seen = _Observation(size, mtime, since)
                if now - seen.since >= self.settle and now - mtime >= min(self.settle, 0.05):
                    ready.append((path, size, mtime))
                    del self._files[path]
        return ready


class _Handler(FileSystemEventHandler):
    def __init__(self, watcher: FolderWatcher) -> None:
        self.watcher = watcher

    def on_created(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.consider(Path(os.fsdecode(event.src_path)))

    def on_modified(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.consider(Path(os.fsdecode(event.src_path)))

    def on_closed(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.consider(Path(os.fsdecode(event.src_path)))

    def on_moved(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self.watcher.scan_folder(Path(os.fsdecode(event.dest_path)))
        else:
            self.watcher.gone(Path(os.fsdecode(event.src_path)))
            self.watcher.consider(Path(os.fsdecode(event.dest_path)))

    def on_deleted(self, event: FileSystemEvent) -> None:
        if not event.is_directory:
            self.watcher.gone(Path(os.fsdecode(event.src_path)))


@dataclass
class _Stats:
    submitted: int = 0
    captioned: int = 0
    failed: int = 0
    skipped: int = 0
    last_error: str | None = None
    catch_up_seconds: float | None = None
    catch_up_queued: int = 0
    observers: dict[str, str] = field(default_factory=dict)


class FolderWatcher:
    name = "watch"

    def __init__(
        self,
        folders: list[Path],
        *,
        pipeline: CaptionPipeline | None,
        store: CaptionRepository | None,
        generation: GenerationSettings,
        settle_seconds: float = default("watch_settle_seconds"),
        recursive: bool = True,
        polling: bool = False,
        mode: str = "caption",
        publish: Publish | None = None,
        metrics: Metrics | None = None,
        max_file_size: int = default("max_file_size"),
        poll_interval: float = 1.0,
        follow_symlinks: bool = False,
        backoff: Backoff = WORK,
    ) -> None:
        if mode == "publish" and publish is None:
            raise ValueError("WATCH_MODE=publish needs BROKER_URL: the watcher publishes to the queue")
        self.folders = [f.expanduser().resolve() for f in folders]
        self.pipeline = pipeline
        self.store = store
        self.generation = generation
        self.recursive = recursive
        self.polling = polling
        self.mode = mode
        self.publish = publish
        self.metrics = metrics or Metrics()
        self.max_file_size = max_file_size
        self.poll_interval = poll_interval
        self.follow_symlinks = follow_symlinks
        self.backoff = backoff
        self._attempts: dict[Path, int] = {}
        self.tracker = StabilityTracker(settle_seconds)
        self.stats = _Stats()
        self._observers: dict[Path, Any] = {}
        self._identity: dict[Path, tuple[int, int] | None] = {}  # (device, inode): a folder replaced shows
        self._next_guard = 0.0
        self._stop = threading.Event()
        self.catch_up_done = threading.Event()
        # Set once every folder has its observer: until then /health says `starting`, not a
        # `running` watcher with no folders (the runtime lists the watcher before starting it).
        self._started = threading.Event()
        self._worker = threading.Thread(target=self._run, name="watcher", daemon=True)
        # Sidecars (.xmp, .aae, a Takeout .json per photo) can outnumber the photos: one line per
        # kind of name, and the paths counted once each within a bounded memory.
        self._skipped_kinds: set[str] = set()
        self._skipped_paths: set[Path] = set()
        self._inflight: set[Future[CaptionResult]] = set()
        self._inflight_lock = threading.Lock()
        self._retry_at: dict[Path, float] = {}
        self._publish_failing = False  # publish mode: the last publish failed (the broker is away)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pipeline: CaptionPipeline | None,
        store: CaptionRepository | None,
        metrics: Metrics | None = None,
        publish: Publish | None = None,
    ) -> FolderWatcher:
        return cls(
            settings.watch_dirs,
            pipeline=pipeline,
            store=store,
            generation=settings.generation(),
            settle_seconds=settings.watch_settle_seconds,
            recursive=settings.watch_recursive,
            polling=settings.watch_polling,
            mode=settings.watch_mode,
            publish=publish,
            metrics=metrics,
            max_file_size=settings.max_file_size,
            follow_symlinks=settings.watch_follow_symlinks,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        for folder in self.folders:
            folder.mkdir(parents=True, exist_ok=True)
            self._identity[folder] = _identity(folder)
            self._observers[folder] = self._observe(folder)
        self._worker.start()
        self._started.set()
        threading.Thread(target=self._catch_up, name="watcher-catch-up", daemon=True).start()

    def _guard_folders(self) -> None:
        """Notice a watched folder deleted, replaced or (un)mounted: its inotify watch died with
        it, and files put in the new one would never be seen while /health said all was well.
        A folder gone is reported (`missing`); one back is watched again and caught up."""
        for folder in self.folders:
            now = _identity(folder)
            if now == self._identity[folder]:
                continue
            self._identity[folder] = now
            with contextlib.suppress(Exception):
                self._observers[folder].stop()
            if now is None:
                self.stats.observers[str(folder)] = "missing"
                self.stats.last_error = f"{folder}: the watched folder is gone"
                log.warning(
                    "watched folder %s is gone (deleted or unmounted); watching it again once it is back", folder
                )
                continue
            try:
                self._observers[folder] = self._observe(folder)
            except OSError as exc:  # gone again before we could watch it: the next check retries
                self._identity[folder] = None
                self.stats.observers[str(folder)] = "missing"
                log.warning("cannot watch %s yet: %s", folder, exc)
                continue
            log.info("watched folder %s is back (%s): catching up", folder, self.stats.observers[str(folder)])
            threading.Thread(target=self._catch_up, args=([folder],), name="watcher-catch-up", daemon=True).start()

    def _observe(self, folder: Path) -> Any:
        handler = _Handler(self)
        if not self.polling:
            observer: Any = Observer()
            try:
                observer.schedule(handler, str(folder), recursive=self.recursive)
                observer.start()
                self.stats.observers[str(folder)] = "inotify"
                return observer
            except OSError as exc:
                log.warning(
                    "cannot use inotify for %s (%s): falling back to polling; raise "
                    "fs.inotify.max_user_watches (sysctl) or set WATCH_POLLING=true",
                    folder,
                    exc,
                )
                with contextlib.suppress(Exception):
                    observer.stop()
        observer = PollingObserver(timeout=self.poll_interval)
        observer.schedule(handler, str(folder), recursive=self.recursive)
        observer.start()
        self.stats.observers[str(folder)] = "polling"
        return observer

    def stop(self, timeout: float = 60.0) -> None:
        """Stop watching; files already handed to the pipeline finish (the runtime drains it)."""
        self._stop.set()
        if self._worker.is_alive():  # first: it is what replaces the observer of a folder that came back
            self._worker.join(timeout)
        for observer in self._observers.values():
            observer.stop()
        for observer in self._observers.values():
            observer.join(timeout)
        self._observers.clear()
        deadline = time.monotonic() + timeout
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)

    def _state(self) -> str:
        if self._stop.is_set():
            return "stopped"
        if not self._started.is_set():
            return "starting"
        if "missing" in self.stats.observers.values() or self._publish_failing:
            return "degraded"
        return "running"

    def health(self) -> dict[str, Any]:
        """`degraded` while a watched folder is gone or (publish mode) publishing fails: files
        are then not getting through, though the process runs."""
        return {
            "state": self._state(),
            "mode": self.mode,
            "folders": self.stats.observers,
            "pending": len(self.tracker),
            "in_flight": len(self._inflight),
            "captioned": self.stats.captioned,
            "failed": self.stats.failed,
            "catch_up_seconds": self.stats.catch_up_seconds,
            "last_error": self.stats.last_error,
        }

    # -- events ---------------------------------------------------------------------------

    def consider(self, path: Path) -> None:
        if is_temporary(path) or any(part.startswith(".") for part in path.parts[-3:-1]):
            return
        if not is_image_name(path):
            self._skip(path)
            return
        self.tracker.touch(path)

    def _skip(self, path: Path) -> None:
        if path in self._skipped_paths:
            return
        if len(self._skipped_paths) >= _SKIPPED_REMEMBERED:
            self._skipped_paths.clear()  # a path seen again after this is counted again
        self._skipped_paths.add(path)
        self.stats.skipped += 1
        self.metrics.watch_files.labels("skipped").inc()
        kind = path.suffix.lower() or "(no suffix)"
        if kind not in self._skipped_kinds:
            self._skipped_kinds.add(kind)
            log.info(
                "skipping %s: not an image (by its name); further %s files are skipped without a line, "
                'counted in blip2_watch_files_total{outcome="skipped"}',
                path,
                kind,
            )

    def gone(self, path: Path) -> None:
        self.tracker.forget(path)
        if self.store is not None and is_image_name(path):
            try:
                self.store.mark_gone(Source.WATCH.value, str(path))
            except TransientError as exc:
                log.warning("could not mark %s as gone: %s", path, exc.message)

    def scan_folder(self, folder: Path, known: dict[str, tuple[int | None, float | None]] | None = None) -> int:
        """Touch every image under `folder` that the store does not know by (path, size, mtime)."""
        touched = 0
        for path in self._walk(folder):
            if known is not None:
                seen = known.get(utf8_text(str(path)))  # stored as the store spells it
                current = _stat(path)
                if (
                    seen is not None
                    and current is not None
                    and seen[0] == current[0]
                    and seen[1] is not None
                    and abs(seen[1] - current[1]) < 1e-6
                ):
                    continue
            self.consider(path)
            touched += 1
        return touched

    def _walk(self, folder: Path) -> Iterator[Path]:
        if not folder.is_dir():
            return
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if self.recursive else []
            for name in sorted(files):
                yield Path(root) / name

    def _catch_up(self, folders: list[Path] | None = None) -> None:
        started = time.monotonic()
        total = 0
        for folder in folders if folders is not None else self.folders:
            known: dict[str, tuple[int | None, float | None]] = {}
            if self.store is not None:
                try:
                    known = self.store.known_files(None, str(folder) + os.sep)
                except TransientError as exc:
                    log.warning("catch-up of %s without the store (%s): every file is re-checked", folder, exc.message)
            total += self.scan_folder(folder, known)
        took = time.monotonic() - started
        if folders is not None:  # a folder that came back: the start's figures stay
            log.info(
                "catch-up of %s queued %d new or changed files in %.1fs", ", ".join(map(str, folders)), total, took
            )
            return
        self.stats.catch_up_queued = total
        self.stats.catch_up_seconds = took
        self.catch_up_done.set()
        log.info("catch-up scan queued %d new or changed files in %.1fs", total, took)

    # -- work -----------------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            now = time.monotonic()
            if now >= self._next_guard:
                self._next_guard = now + FOLDER_CHECK_SECONDS
                self._guard_folders()
            for path, when in list(self._retry_at.items()):
                if when <= now:
                    del self._retry_at[path]
                    self.tracker.touch(path)
            for path, size, mtime in self.tracker.due():
                if self._stop.is_set():
                    self.tracker.touch(path)  # not taken: the next start's catch-up finds it
                    break
                try:
                    self._handle(path, size, mtime)
                except Exception as exc:  # the loop must survive any one file
                    self.stats.last_error = f"{path}: {exc}"
                    log.exception("watching %s failed", path)

    def _handle(self, path: Path, size: int, mtime: float) -> None:
        if self.mode == "publish":
            assert self.publish is not None
            try:
                self.publish({"path": str(path)})
            except Exception as exc:
                self._publish_failing = True
                self._retry_later(path, f"publishing failed: {exc}")
                return
            self._publish_failing = False
            return
        try:
            # The watched folders are the roots: a symlink pointing out of them is not followed
            # (its target's bytes would be stored and its thumbnail served) unless configured.
            found = read_path(str(path), None if self.follow_symlinks else self.folders, self.max_file_size)
        except NotFound:
            return  # deleted while settling
        except Forbidden:
            self._failed(path, "a symlink out of the watched folders", "skipped", _SYMLINK_SKIPPED)
            return
        except CaptionError as exc:  # too large, unreadable: stored as failed, keyed by its path
            self._record_unreadable(path, size, mtime, exc)
            return
        data = found.data
        if (found.size, found.mtime) != (size, mtime):
            self.tracker.touch(path)  # changed between stability and reading: wait again
            return
        request = CaptionRequest(Source.WATCH, str(path), data, self.generation, file_size=size, file_mtime=mtime)
        assert self.pipeline is not None
        future = self.pipeline.submit(request, wait=True)
        self.stats.submitted += 1
        with self._inflight_lock:
            self._inflight.add(future)
        future.add_done_callback(lambda f: self._done(path, f))

    def _record_unreadable(self, path: Path, size: int, mtime: float, exc: CaptionError) -> None:
        """A file that cannot be read has no hash: it is stored as failed under its path (the
        catch-up then knows it, until it changes), so nothing seen vanishes without a record."""
        if self.pipeline is not None and isinstance(exc, PermanentError):
            request = CaptionRequest(
                Source.WATCH, str(path), f"file:{path}".encode(), self.generation, file_size=size, file_mtime=mtime
            )
            try:
                self.pipeline.record_failure(request, exc)
            except TransientError as err:
                self._retry_later(path, err.message)
                return
        self._failed(path, exc.message, "failed", "%s stored as failed: %s")

    def _done(self, path: Path, future: Future[CaptionResult]) -> None:
        with self._inflight_lock:
            self._inflight.discard(future)
        exc = future.exception()
        if isinstance(exc, TransientError):
            self._retry_later(path, exc.message)
            return
        if exc is not None:
            self._failed(path, str(exc), "error", "captioning %s failed: %s")
            return
        result = future.result()
        self._attempts.pop(path, None)
        if result.ok:
            self.stats.captioned += 1
            self.metrics.watch_files.labels("captioned").inc()
        else:
            self._failed(path, result.error or "failed", "failed", "%s stored as failed: %s")

    def _failed(self, path: Path, reason: str, outcome: str, message: str) -> None:
        """One place counts a failure: /health's stats, the metric, the log line."""
        self.stats.failed += 1
        self.stats.last_error = f"{path}: {reason}"
        self.metrics.watch_files.labels(outcome).inc()
        log.warning(message, path, reason)

    def _retry_later(self, path: Path, reason: str) -> None:
        attempt = self._attempts.get(path, 0) + 1
        self._attempts[path] = attempt
        delay = self.backoff.delay(attempt)
        self.stats.last_error = f"{path}: {reason}"
        log.warning("%s will be retried in %.1fs: %s", path, delay, reason)
        self._retry_at[path] = time.monotonic() + delay
