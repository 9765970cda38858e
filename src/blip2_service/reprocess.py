"""Caption stored images again with the current model and settings (PhotoPrism and Immich can).

Selects images by their stored captions (model, source, status, path prefix, since/until),
re-reads each from a place it was seen whose file is still readable, and captions it through
the pipeline like any other request: new rows for a new model or new settings, the old rows kept
and still listed. `--via-queue` publishes the paths for GPU workers instead.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

from .domain import CaptionError, CaptionRequest, CaptionResult, GenerationSettings, Source
from .intake import LocalFile, read_path
from .pipeline import CaptionPipeline


class NoReadableCopy(CaptionError):
    """Every place the image was seen is gone, unreadable, changed or outside the allowed roots."""

    status = 409


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: list[str] = field(default_factory=list)  # image sha256s with no readable file

    def line(self) -> str:
        return f"reprocess: {self.done} captioned, {len(self.skipped)} skipped (no readable file), {self.failed} failed"


def read_copy(sha256: str, paths: list[str], roots: list[Path] | None, max_bytes: int) -> LocalFile:
    """The first listed file that still holds exactly this image."""
    for path in paths:
        try:
            found = read_path(path, roots, max_bytes)
        except CaptionError:
            continue
        if hashlib.sha256(found.data).hexdigest() == sha256:
            return found
    raise NoReadableCopy(f"No readable copy of image {sha256}: every place it was seen is gone or changed")


def caption_again(
    pipeline: CaptionPipeline,
    chosen: list[tuple[str, list[str]]],
    generation: GenerationSettings,
    *,
    max_bytes: int,
    on_done: Callable[[str, str | None, CaptionResult | BaseException], None],
) -> Summary:
    """Caption every chosen image from a readable copy; `on_done(sha256, path, outcome)` per image."""
    summary = Summary()
    pending: list[tuple[str, str, Future[CaptionResult]]] = []
    for sha256, paths in chosen:
        try:
            found = read_copy(sha256, paths, None, max_bytes)
        except NoReadableCopy as exc:
            summary.skipped.append(sha256)
            on_done(sha256, None, exc)
            continue
        request = CaptionRequest(
            Source.CLI, found.real_path, found.data, generation, file_size=found.size, file_mtime=found.mtime
        )
        pending.append((sha256, found.real_path, pipeline.submit(request, wait=True)))
    for sha256, path, future in pending:
        try:
            result = future.result()
        except Exception as exc:
            summary.failed += 1
            on_done(sha256, path, exc)
            continue
        if result.ok:
            summary.done += 1
        else:
            summary.failed += 1
        on_done(sha256, path, result)
    return summary


def paths_to_publish(chosen: list[tuple[str, list[str]]]) -> Iterator[tuple[str, str | None]]:
    """(sha256, the path a worker should read, or None when no copy is left) for --via-queue."""
    for sha256, paths in chosen:
        readable = next((p for p in paths if Path(p).is_file()), None)
        yield sha256, readable
