from pathlib import Path

from blip2_service.watcher import StabilityTracker, is_temporary


class FakeFs:
    def __init__(self) -> None:
        self.now = 1000.0
        self.files: dict[Path, tuple[int, float]] = {}

    def write(self, path: Path, size: int) -> None:
        self.files[path] = (size, self.now)

    def stat(self, path: Path) -> tuple[int, float] | None:
        return self.files.get(path)


def _tracker(fs: FakeFs, settle: float = 1.0) -> StabilityTracker:
    return StabilityTracker(settle, clock=lambda: fs.now, stat=fs.stat)


def test_a_file_is_due_only_after_it_stops_changing_for_the_settle_time() -> None:
    fs, p = FakeFs(), Path("/in/a.jpg")
    tracker = _tracker(fs)
    fs.write(p, 0)  # created: nothing written yet
    tracker.touch(p)
    assert tracker.due() == []
    for size in (100, 200, 300):  # a slow writer
        fs.now += 0.5
        fs.write(p, size)
        assert tracker.due() == []
    fs.now += 0.5
    assert tracker.due() == []
    fs.now += 0.6
    assert tracker.due() == [(p, 300, fs.files[p][1])]
    assert len(tracker) == 0  # handed out once


def test_an_old_complete_file_is_due_at_once_for_catch_up() -> None:
    fs, p = FakeFs(), Path("/in/old.jpg")
    fs.write(p, 10)
    fs.now += 3600
    tracker = _tracker(fs)
    tracker.touch(p)
    assert [d[0] for d in tracker.due()] == [p]


def test_vanished_and_forgotten_files_are_dropped() -> None:
    fs, p, q = FakeFs(), Path("/in/a.jpg"), Path("/in/b.jpg")
    tracker = _tracker(fs)
    fs.write(p, 1)
    tracker.touch(p)
    tracker.touch(q)  # never existed
    tracker.forget(p)
    fs.now += 5
    assert tracker.due() == []
    assert len(tracker) == 0


def test_temporary_names() -> None:
    for name in ("a.jpg.part", "a.tmp", "a.jpg.crdownload", "a.jpg~", ".hidden.jpg"):
        assert is_temporary(Path("/in") / name), name
    for name in ("a.jpg", "b.PNG", "part.jpg"):
        assert not is_temporary(Path("/in") / name), name
