import threading
import time
from collections.abc import Sequence

import pytest

from blip2_service.batching import MicroBatcher


def test_a_burst_is_processed_in_batches_up_to_max_size() -> None:
    seen: list[int] = []
    release = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        release.wait(5)
        seen.append(len(items))
        return [i * 2 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_size=4, max_wait_s=0.05)
    batcher.start()
    futures = [batcher.put(i) for i in range(10)]
    release.set()
    assert [f.result(5) for f in futures] == [i * 2 for i in range(10)]
    batcher.stop(5)
    assert sum(seen) == 10
    assert max(seen) == 4
    assert len(seen) <= 4  # first may be alone (it started before the burst), the rest are full


def test_a_lone_item_waits_at_most_max_wait() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: list(items), max_size=8, max_wait_s=0.05)
    batcher.start()
    started = time.monotonic()
    assert batcher.put(7).result(5) == 7
    assert time.monotonic() - started < 2.0
    batcher.stop(5)


def test_a_lone_item_goes_at_once_when_nothing_is_on_its_way() -> None:
    """With an upstream that says nothing else is coming, max_wait is not spent waiting for company
    (here a minute: the result would time out)."""
    sizes: list[int] = []

    def process(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_size=8, max_wait_s=60, incoming=lambda: 0)
    batcher.start()
    assert batcher.put(7).result(10) == 7
    assert batcher.put(8).result(10) == 8
    batcher.stop(5)
    assert sizes == [1, 1]


def test_per_item_exceptions_and_failing_batches_reach_their_futures() -> None:
    def process(items: Sequence[int]) -> list[int | BaseException]:
        if 99 in items:
            raise RuntimeError("whole batch broke")
        return [ValueError(f"bad {i}") if i < 0 else i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_size=1, max_wait_s=0)
    batcher.start()
    ok, bad, broken = batcher.put(1), batcher.put(-1), batcher.put(99)
    assert ok.result(5) == 1
    with pytest.raises(ValueError, match="bad -1"):
        bad.result(5)
    with pytest.raises(RuntimeError, match="whole batch broke"):
        broken.result(5)
    # the thread survived
    assert batcher.put(2).result(5) == 2
    batcher.stop(5)


def test_stop_finishes_what_was_queued() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: list(items), max_size=2, max_wait_s=0)
    futures = [batcher.put(i) for i in range(5)]
    batcher.start()
    batcher.stop(5)
    assert [f.result(0) for f in futures] == list(range(5))


def test_a_batch_waits_for_items_known_to_be_on_their_way() -> None:
    """With work still being decoded upstream, the batcher holds (a share of one batch's time)."""
    sizes: list[int] = []
    incoming = [0]

    def process(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        time.sleep(0.8)  # a slow model: holding 0.2 s for a fuller batch is worth it
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_size=8, max_wait_s=0.005, incoming=lambda: incoming[0])
    batcher.start()
    batcher.put(0).result(5)  # teaches the batcher what a batch costs
    incoming[0] = 3
    first = batcher.put(1)

    def arrive_late() -> None:
        for i in (2, 3, 4):
            time.sleep(0.02)
            batcher.put(i)  # as the pipeline does: enqueue, then stop counting it as incoming
            incoming[0] -= 1

    threading.Thread(target=arrive_late).start()
    first.result(5)
    batcher.stop(5)
    assert sizes == [1, 4]  # without the hint: [1, 1, 3] or similar


def test_the_first_batch_holds_for_a_burst_still_being_decoded() -> None:
    """A fresh batcher knows no batch cost yet; a burst's first item must not go alone."""
    sizes: list[int] = []
    incoming = [4]

    def process(items: Sequence[int]) -> list[int]:
        sizes.append(len(items))
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(
        process, max_size=8, max_wait_s=0.005, max_hold_s=0.5, incoming=lambda: incoming[0]
    )
    batcher.start()
    first = batcher.put(0)
    incoming[0] -= 1

    def arrive_late() -> None:
        for i in (1, 2, 3):
            time.sleep(0.03)
            batcher.put(i)
            incoming[0] -= 1

    threading.Thread(target=arrive_late).start()
    first.result(5)
    batcher.stop(5)
    assert sizes == [4]  # before: [1, 3] (the hold was only max_wait while the cost was unknown)


def test_an_urgent_item_goes_in_the_next_batch_ahead_of_everything_queued_before_it() -> None:
    """A folder import queues hundreds of images; an HTTP request put behind them waited for all."""
    batches: list[list[int]] = []
    first_running = threading.Event()
    release = threading.Event()

    def process(items: Sequence[int]) -> list[int]:
        first_running.set()
        release.wait(5)
        batches.append(list(items))
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(process, max_size=2, max_wait_s=0.0, incoming=lambda: 0)
    batcher.start()
    running = batcher.put(0)
    assert first_running.wait(5)  # the model is busy with item 0
    queued = [batcher.put(i) for i in range(1, 7)]
    urgent = batcher.put(100, urgent=True)
    release.set()
    assert urgent.result(5) == 100 and running.result(5) == 0 and [f.result(5) for f in queued] == list(range(1, 7))
    batcher.stop(5)
    assert batches[0] == [0]
    assert batches[1][0] == 100  # next, ahead of the six queued before it
    assert [i for batch in batches for i in batch if i != 100] == list(range(7))  # the others keep their order
