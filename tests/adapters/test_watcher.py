"""The watcher over real files, the real tiny-random model and a real SQLite store."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from blip2_service.domain import GenerationSettings
from blip2_service.pipeline import CaptionPipeline
from blip2_service.retry import Backoff
from blip2_service.store import CaptionFilter, CaptionRepository
from blip2_service.store.tables import captions, sightings
from blip2_service.watcher import FolderWatcher

from ..conftest import image_bytes, wait_until

FAST = GenerationSettings(num_beams=1, max_new_tokens=4)


def _count(store: CaptionRepository, table: Any = captions) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar_one())


@pytest.fixture(params=[False, True], ids=["inotify", "polling"])
def polling(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture
def start_watcher(
    make_pipeline: Callable[..., CaptionPipeline], sqlite_store: CaptionRepository, polling: bool, tmp_path: Path
) -> Iterator[Callable[..., FolderWatcher]]:
    started: list[FolderWatcher] = []
    pipeline = make_pipeline(sqlite_store, max_pending=256, batch_max_size=16)

    def start(folder: Path | None = None, settle: float = 0.4, **kw: Any) -> FolderWatcher:
        watcher = FolderWatcher(
            [folder or tmp_path / "inbox"],
            pipeline=pipeline,
            store=sqlite_store,
            generation=FAST,
            settle_seconds=settle,
            polling=polling,
            poll_interval=0.2,
            backoff=Backoff(0.5, 0.5),
            **kw,
        )
        watcher.start()
        started.append(watcher)
        return watcher

    yield start
    for watcher in started:
        watcher.stop()


def test_two_hundred_images_copied_at_once_are_each_captioned_once(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    for i in range(200):
        (staging / f"img{i:03d}.jpg").write_bytes(image_bytes(1000 + i, size=(48, 48)))
    inbox = tmp_path / "inbox"
    watcher = start_watcher(inbox)
    shutil.copytree(staging, inbox / "batch")
    wait_until(lambda: _count(sqlite_store) == 200, 180, "200 captions")
    time.sleep(1.0)  # nothing more arrives late
    assert _count(sqlite_store) == 200
    assert _count(sqlite_store, sightings) == 200
    assert watcher.stats.submitted == 200


def test_a_slow_writer_is_captioned_once_from_the_complete_file(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    watcher = start_watcher(inbox, settle=1.0)
    data = image_bytes(7, size=(300, 300), fmt="PNG")
    chunks = [data[i : i + len(data) // 10 + 1] for i in range(0, len(data), len(data) // 10 + 1)]
    with (inbox / "slow.png").open("wb") as fh:
        for chunk in chunks:  # about 3 s in all
            fh.write(chunk)
            fh.flush()
            time.sleep(0.3)
    wait_until(lambda: _count(sqlite_store) >= 1, 30, "the caption")
    time.sleep(1.5)
    items, _ = sqlite_store.query(CaptionFilter())
    assert len(items) == 1
    assert items[0]["status"] == "succeeded"
    assert items[0]["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert watcher.stats.submitted == 1


def test_part_files_wait_for_their_rename_and_duplicates_are_one_caption(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    start_watcher(inbox)
    data = image_bytes(8)
    (inbox / "download.jpg.part").write_bytes(data)
    time.sleep(1.5)
    assert _count(sqlite_store) == 0  # ignored while it has a temporary name
    (inbox / "download.jpg.part").rename(inbox / "download.jpg")
    wait_until(lambda: _count(sqlite_store) == 1, 30, "the renamed file")
    (inbox / "copy-of-download.jpg").write_bytes(data)  # same bytes, second name
    wait_until(lambda: _count(sqlite_store, sightings) == 2, 30, "the second sighting")
    assert _count(sqlite_store) == 1
    image = sqlite_store.image(hashlib.sha256(data).hexdigest())
    assert image is not None
    assert sorted(Path(loc["source_ref"]).name for loc in image["locations"]) == [
        "copy-of-download.jpg",
        "download.jpg",
    ]


def test_non_images_are_skipped_broken_images_fail_and_deletes_keep_captions(
    start_watcher: Callable[..., FolderWatcher],
    sqlite_store: CaptionRepository,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="blip2_service.watcher")
    inbox = tmp_path / "inbox"
    watcher = start_watcher(inbox)
    for name in ("notes.txt", "todo.txt", "good.xmp"):  # sidecars: one line per kind, each counted
        (inbox / name).write_text("not an image")
    (inbox / "broken.jpg").write_bytes(image_bytes(9, size=(200, 200))[:1500])
    (inbox / "good.jpg").write_bytes(image_bytes(10))
    wait_until(lambda: _count(sqlite_store) == 2, 30, "two results")
    failed, _ = sqlite_store.query(CaptionFilter(status="failed"))
    assert len(failed) == 1 and failed[0]["source_ref"].endswith("broken.jpg") and failed[0]["error"]
    assert watcher.stats.skipped == 3
    lines = [r.getMessage() for r in caplog.records if "not an image" in r.getMessage()]
    assert len(lines) == 2 and any(".txt files are skipped" in x for x in lines), lines
    (inbox / "good.jpg").unlink()
    sha = hashlib.sha256(image_bytes(10)).hexdigest()

    def gone() -> bool:
        image = sqlite_store.image(sha)
        return image is not None and image["locations"][0]["gone_at"] is not None

    wait_until(gone, 30, "the sighting to be marked gone")
    assert _count(sqlite_store) == 2


def test_a_restart_catches_up_without_recaptioning(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    (inbox / "old").mkdir(parents=True)
    for i in range(10):
        (inbox / "old" / f"{i}.jpg").write_bytes(image_bytes(2000 + i))
    first = start_watcher(inbox)
    wait_until(lambda: _count(sqlite_store) == 10, 60, "the first ten")
    first.stop()
    for i in range(20):  # arrive while the service is down
        (inbox / f"new{i}.jpg").write_bytes(image_bytes(3000 + i))
    second = start_watcher(inbox)
    wait_until(lambda: _count(sqlite_store) == 30, 60, "the twenty new files")
    time.sleep(1.0)
    assert second.stats.submitted == 20  # the ten stored files were recognised, not re-read
    # a file rewritten in place with new content is captioned again
    (inbox / "old" / "0.jpg").write_bytes(image_bytes(4000))
    wait_until(lambda: _count(sqlite_store) == 31, 30, "the rewritten file")


# File names as Linux allows them: bytes that are not UTF-8, a newline, markup.
ODD_NAMES = {
    b"\xff\xfe.jpg": r"\xff\xfe.jpg",
    "café.jpg".encode(): "café.jpg",
    b"new\nline.jpg": "new\nline.jpg",
    b'<b onmouseover="x">.jpg': '<b onmouseover="x">.jpg',
}


def test_names_that_are_not_utf8_are_captioned_recognised_after_a_restart_and_marked_gone(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for i, name in enumerate(ODD_NAMES):
        with open(os.path.join(os.fsencode(inbox), name), "wb") as fh:
            fh.write(image_bytes(5000 + i))
    first = start_watcher(inbox)
    wait_until(lambda: _count(sqlite_store) == len(ODD_NAMES), 60, "a result per name")
    items, _ = sqlite_store.query(CaptionFilter())
    assert {i["status"] for i in items} == {"succeeded"}
    assert sorted(Path(i["source_ref"]).name for i in items) == sorted(ODD_NAMES.values())
    first.stop()
    second = start_watcher(inbox)
    assert second.catch_up_done.wait(30)
    assert second.stats.catch_up_queued == 0  # each recognised under its stored name
    os.unlink(os.path.join(os.fsencode(inbox), b"\xff\xfe.jpg"))

    def gone() -> bool:
        image = sqlite_store.image(hashlib.sha256(image_bytes(5000)).hexdigest())
        return image is not None and image["locations"][0]["gone_at"] is not None

    wait_until(gone, 30, "the undecodable name to be marked gone")


def test_when_inotify_cannot_be_used_the_folder_is_polled_with_one_log_line(
    make_pipeline: Callable[..., CaptionPipeline],
    sqlite_store: CaptionRepository,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The inotify watch limit cannot be exhausted safely on a shared machine: this one fake
    observer raises what watchdog raises then (ENOSPC), and the real polling observer takes over."""
    import errno

    import blip2_service.watcher as watcher_module

    class ExhaustedInotify:
        def schedule(self, *args: Any, **kwargs: Any) -> None:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")

        def stop(self) -> None:
            pass

    monkeypatch.setattr(watcher_module, "Observer", ExhaustedInotify)
    inbox = tmp_path / "inbox"
    watcher = FolderWatcher(
        [inbox],
        pipeline=make_pipeline(sqlite_store),
        store=sqlite_store,
        generation=FAST,
        settle_seconds=0.3,
        poll_interval=0.2,
    )
    watcher.start()
    try:
        (inbox / "x.jpg").write_bytes(image_bytes(55))
        wait_until(lambda: _count(sqlite_store) == 1, 30, "the polled file")
    finally:
        watcher.stop()
    assert watcher.health()["folders"] == {str(inbox.resolve()): "polling"}
    lines = [r.message for r in caplog.records if "fs.inotify.max_user_watches" in r.message]
    assert len(lines) == 1


@pytest.mark.parametrize("follow", [False, True])
def test_a_symlink_out_of_the_watched_folder_is_skipped_unless_following_is_configured(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path, follow: bool
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "private" / "secret.jpg"
    secret.parent.mkdir()
    secret.write_bytes(image_bytes(4242))
    (inbox / "inside.jpg").write_bytes(image_bytes(4243))
    os.symlink(secret, inbox / "link.jpg")
    watcher = start_watcher(inbox, follow_symlinks=follow)
    expected = 2 if follow else 1
    wait_until(lambda: watcher.stats.captioned + watcher.stats.failed >= 2, 30, "both files handled")
    secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
    with sqlite_store.engine.connect() as conn:
        stored = {row[0] for row in conn.execute(select(captions.c.image_sha256))}
    assert len(stored) == expected
    assert (secret_sha in stored) is follow  # never stored (nor its thumbnail served) unless allowed
    if not follow:
        assert "symlink out of the watched folders" in (watcher.stats.last_error or "")


def test_a_file_too_large_to_read_is_stored_as_failed_under_its_path(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    big = inbox / "huge.jpg"
    big.write_bytes(image_bytes(4300, size=(400, 400)))
    watcher = start_watcher(inbox, max_file_size=1000)
    wait_until(lambda: watcher.stats.failed >= 1, 30, "the file to be recorded")
    failed, _ = sqlite_store.query(CaptionFilter(status="failed"))
    assert [f["source_ref"] for f in failed] == [str(big.resolve())] or [f["source_ref"] for f in failed] == [str(big)]
    assert "MAX_FILE_SIZE" in failed[0]["error"] and failed[0]["source"] == "watch"


def test_a_watched_folder_deleted_and_made_again_is_reported_then_watched_again_and_caught_up(
    start_watcher: Callable[..., FolderWatcher], sqlite_store: CaptionRepository, tmp_path: Path
) -> None:
    """An operator's `rm -rf inbox && mkdir inbox`, or a share unmounted and mounted again: the old
    inotify watch died with the folder, and files put in the new one were never captioned while
    /health said "running"."""
    inbox = tmp_path / "inbox"
    watcher = start_watcher(inbox)
    (inbox / "before.jpg").write_bytes(image_bytes(1301))
    wait_until(lambda: _count(sqlite_store) == 1, 30, "the first caption")
    shutil.rmtree(inbox)
    wait_until(lambda: watcher.health()["folders"][str(inbox)] == "missing", 30, "the folder reported missing")
    assert watcher.health()["state"] == "degraded"
    inbox.mkdir()
    (inbox / "early.jpg").write_bytes(image_bytes(1302))  # before the watch is back: the catch-up finds it
    wait_until(lambda: watcher.health()["folders"][str(inbox)] != "missing", 30, "the folder watched again")
    (inbox / "after.jpg").write_bytes(image_bytes(1303))  # after: the new watch sees it
    wait_until(lambda: _count(sqlite_store) == 3, 60, "both new files captioned")
    assert watcher.health()["state"] == "running"
    refs = sorted(Path(item["source_ref"]).name for item in sqlite_store.query(CaptionFilter())[0])
    assert refs == ["after.jpg", "before.jpg", "early.jpg"]


def test_health_says_starting_until_every_folder_is_watched(
    tmp_path: Path, make_pipeline: Any, sqlite_store: CaptionRepository
) -> None:
    """The runtime lists a watcher before it starts it: /health said `running`, with no folder
    watched yet (a test saw it under load)."""
    inbox = tmp_path / "inbox"
    watcher = FolderWatcher([inbox], pipeline=make_pipeline(sqlite_store), store=sqlite_store, generation=FAST)
    assert watcher.health()["state"] == "starting" and watcher.health()["folders"] == {}
    watcher.start()
    try:
        health = watcher.health()
        assert health["state"] == "running" and health["folders"] == {str(inbox.resolve()): "inotify"}
    finally:
        watcher.stop()
    assert watcher.health()["state"] == "stopped"
