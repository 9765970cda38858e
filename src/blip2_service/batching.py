"""The micro-batcher: one thread that owns the model and feeds it batches.

Requests from every source land in one queue; the thread takes the first and
everything queued behind it (up to `max_size`), and processes them in one call.
It waits for more only when more are known to be on their way (`incoming`:
accepted upstream, still being decoded), up to `max_wait` or a share of one
batch's time: a lone request goes at once, instead of paying the wait for
company that is not coming. Under load, batches fill by themselves: whatever
arrives while the model runs is taken together next time.

Two lanes: an `urgent` item (a person waiting on an HTTP answer) is taken before every item
already queued in the other lane (a folder import, a queue backlog), so a bulk load never puts
hundreds of images between a request and the model.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class _Item(Generic[T, R]):
    payload: T
    future: Future[R] = field(default_factory=Future)


_STOP = object()
_URGENT, _NORMAL, _LAST = 0, 1, 2  # lanes: a PriorityQueue hands out the lowest first


class MicroBatcher(Generic[T, R]):
    """Collects items into batches for `process`, which returns one result or exception per item."""

    def __init__(
        self,
        process: Callable[[Sequence[T]], Sequence[R | BaseException]],
        *,
        max_size: int,
        max_wait_s: float,
        name: str = "inference",
        on_batch: Callable[[int, float], None] | None = None,
        incoming: Callable[[], int] | None = None,
        max_hold_share: float = 0.25,
        max_hold_s: float = 0.5,
    ) -> None:
        self._process = process
        self.max_size = max_size
        self.max_wait_s = max_wait_s
        # Items accepted upstream and about to arrive (being decoded): worth holding a
        # not-yet-full batch for, up to a share of what one batch costs. A burst then
        # shares one forward pass instead of paying a whole extra batch for its first image.
        self._incoming = incoming
        self._max_hold_share = max_hold_share
        self._max_hold_s = max_hold_s
        self._batch_seconds = 0.0  # moving average of one batch's wall time
        # (lane, arrival, item): lane first, then first come first served within a lane.
        self._queue: queue.PriorityQueue[tuple[int, int, object]] = queue.PriorityQueue()
        self._arrival = itertools.count()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._on_batch = on_batch
        self._started = False

    def start(self) -> None:
        if not self._started:
            self._started = True
            self._thread.start()

    def put(self, payload: T, *, urgent: bool = False) -> Future[R]:
        item: _Item[T, R] = _Item(payload)
        self._queue.put((_URGENT if urgent else _NORMAL, next(self._arrival), item))
        return item.future

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float | None = None) -> None:
        """Finish everything already queued, then end the thread."""
        if self._started:
            self._queue.put((_LAST, next(self._arrival), _STOP))  # after everything queued
            self._thread.join(timeout)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()[2]
            if first is _STOP:
                break
            batch: list[_Item[T, R]] = [first]  # type: ignore[list-item]
            started = time.monotonic()
            deadline = started + self.max_wait_s
            # Before the first batch its cost is unknown: assume it is worth the longest hold, or a
            # service's first burst (and every benchmark's) goes as one lonely image, then the rest.
            expected = self._batch_seconds if self._batch_seconds else float("inf")
            hold_until = started + max(self.max_wait_s, min(self._max_hold_s, self._max_hold_share * expected))
            while len(batch) < self.max_size:
                now = time.monotonic()
                if self._incoming is None:
                    remaining = deadline - now  # upstream unknown: wait max_wait for company
                elif self._incoming() > 0:
                    remaining = min(hold_until - now, 0.005)  # on its way: wait, looking again every 5 ms
                else:
                    remaining = 0.0  # nothing on its way: take what is queued and go
                try:
                    nxt = (self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait())[2]
                except queue.Empty:
                    if self._incoming is not None and self._incoming() > 0 and time.monotonic() < hold_until:
                        continue
                    break
                if nxt is _STOP:
                    stopping = True
                    break
                batch.append(nxt)  # type: ignore[arg-type]
            self._run_batch(batch)

    def _run_batch(self, batch: list[_Item[T, R]]) -> None:
        started = time.perf_counter()
        try:
            results = self._process([item.payload for item in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"batch of {len(batch)} produced {len(results)} results")
        except BaseException as exc:  # the thread must survive any batch
            log.exception("batch of %d failed", len(batch))
            for item in batch:
                item.future.set_exception(exc)
            return
        finally:
            elapsed = time.perf_counter() - started
            self._batch_seconds = elapsed if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * elapsed
            if self._on_batch is not None:
                self._on_batch(len(batch), elapsed)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                item.future.set_exception(result)
            else:
                item.future.set_result(result)
