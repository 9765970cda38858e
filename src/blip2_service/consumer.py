"""RabbitMQ consumer: a thin kombu adapter over the pipeline.

Threads: the consumer thread owns the AMQP connection (kombu channels are not
thread-safe) and only parses, publishes and acks; loading bytes (files, URLs)
happens on an I/O pool and captioning on the pipeline's inference thread.
Finished work comes back through a queue and is acked on the consumer thread,
after the store commit. Anything unacked when a process dies is redelivered,
and the store's unique key turns the redelivery into a cache hit.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from amqp.exceptions import PreconditionFailed
from kombu import Connection, Message
from kombu.mixins import ConsumerProducerMixin

from .amqp_topology import POLL_SECONDS, Topology, broker_errors, connect
from .config import Settings
from .domain import (
    CaptionError,
    CaptionRequest,
    CaptionResult,
    GenerationSettings,
    PermanentError,
    Source,
    TransientError,
    utf8_text,
)
from .fetching import UrlFetcher
from .intake import public_url, read_path
from .metrics import Metrics
from .outcome import queue_result
from .pipeline import CaptionPipeline
from .queue_protocol import REASON_HEADER, QueueRequest, decode_b64, parse_request, peek_id
from .retry import WORK, Backoff

log = logging.getLogger(__name__)

# A few quick retries for a hiccup; past that the error reaches the consumer loop, which
# reconnects (reporting "reconnecting" on /health) and lets the broker redeliver: kombu's
# default would retry forever inside one publish, with the consumer looking "connected".
_PUBLISH_RETRY = {"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}


@dataclass(slots=True)
class _Outcome:
    kind: str  # "ok" | "failed" | "retry" | "bug" | "expired"
    result: CaptionResult | None = None
    error: str | None = None


@dataclass(slots=True)
class _Held:
    """A delivered, not yet acknowledged message and what we know of it."""

    message: Message
    generation: int
    request: QueueRequest | None = None
    attempt: int = 0
    error: PermanentError | None = None  # a message that can never be captioned, still to be recorded
    interactive: bool = False  # from the interactive queue: a gateway's HTTP request


class QueueConsumer(ConsumerProducerMixin):  # type: ignore[misc]
    name = "queue"
    should_stop: bool = False
    connect_max_retries = 0  # kombu's connect makes one attempt; `_run` waits between attempts

    def __init__(
        self,
        broker_url: str,
        *,
        pipeline: CaptionPipeline,
        topology: Topology,
        prefetch: int,
        generation: GenerationSettings,
        max_file_size: int,
        fetcher: UrlFetcher,
        file_roots: list[Path] | None = None,
        metrics: Metrics | None = None,
        backoff: Backoff = WORK,
    ) -> None:
        self.connection: Connection = connect(broker_url)
        self.pipeline = pipeline
        self.topology = topology
        self.prefetch = prefetch
        self.generation = generation
        self.max_file_size = max_file_size
        self.fetcher = fetcher
        self.metrics = metrics or Metrics()
        self.file_roots = file_roots if file_roots is not None else []
        self.backoff = backoff
        self.state = "connecting"
        self.last_error: str | None = None
        self.counts = {"succeeded": 0, "failed": 0, "retried": 0, "expired": 0, "reconnects": 0}
        self._expired_logged = -1e9  # monotonic time of the last line about dropped requests
        self._gen = 0
        self._held: dict[int, _Held] = {}
        self._done: queue.Queue[tuple[_Held, _Outcome]] = queue.Queue()
        self._retries: list[tuple[float, int, _Held]] = []
        self._seq = itertools.count()
        self._io = ThreadPoolExecutor(4, thread_name_prefix="queue-io")
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="queue-fetch", daemon=True)
        self._thread: threading.Thread | None = None
        self._draining = False
        self._consumers: list[Any] = []
        self._stopped = threading.Event()
        self._stop_requested = threading.Event()
        self._broker_errors = broker_errors(self.connection)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        pipeline: CaptionPipeline,
        metrics: Metrics | None = None,
    ) -> QueueConsumer:
        return cls(
            settings.broker_url,
            pipeline=pipeline,
            topology=Topology(settings.queue_name, settings.results_exchange),
            prefetch=settings.prefetch,
            generation=settings.generation(),
            max_file_size=settings.max_file_size,
            fetcher=UrlFetcher.from_settings(settings),
            file_roots=settings.allowed_file_roots,
            metrics=metrics,
        )

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._loop_thread.start()
        self._thread = threading.Thread(target=self._run, name="queue-consumer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        """The one consuming loop: kombu's `consume` on one connection, and between connections
        our backoff, which a stop interrupts (kombu's own `run` would retry inside its connect,
        2 s rising to 30 s, deaf to a stop: a SIGTERM with the broker down waited a minute)."""
        attempt = 0
        try:
            while not self.should_stop:
                try:
                    self._declare_topology()
                    for _ in self.consume(limit=None, safety_interval=POLL_SECONDS):
                        pass
                except _TopologyMismatch as exc:
                    # The queue exists with other arguments: retrying cannot help, and every retry
                    # would look like a broker outage. Stop, saying what differs and what to do.
                    self.state = "failed"
                    self.last_error = (
                        f"queue {self.topology.queue_name!r} exists with other arguments ({exc}); "
                        f"delete it or set QUEUE_NAME to another queue (README, 'Queue topology')"
                    )
                    log.error("queue consumer stopped: %s", self.last_error)
                    self.should_stop = True
                    return
                except self._broker_errors as exc:
                    if self._draining:
                        break  # stopping with no broker: unacked messages are redelivered later
                    attempt = 1 if self.state == "connected" else attempt + 1
                    delay = self.backoff.delay(attempt)
                    self.on_connection_error(exc, delay)
                    self._stop_requested.wait(delay)
                except Exception as exc:
                    self.counts["reconnects"] += 1
                    # An ack or publish on a half-dead connection can raise errors kombu does not
                    # list as connection errors. The thread must live: start over on a fresh
                    # connection (held messages are redelivered).
                    self.state = "reconnecting"
                    self.last_error = f"consumer: {type(exc).__name__}: {exc}"
                    log.exception("queue consumer failed; reconnecting")
                    self._stop_requested.wait(self.backoff.first)
        finally:
            if self.state != "failed":
                self.state = "stopped"
            self._stopped.set()

    def _declare_topology(self) -> None:
        """Declare before consuming: kombu's loop would take a refused declaration for a lost
        connection and retry it forever, where we want to stop with the reason."""
        with self.connection.clone() as conn:
            conn.ensure_connection(max_retries=0)  # one attempt: `_run` owns the waiting
            self._declare(conn.channel())

    def _declare(self, channel: Any) -> None:
        """Only here does PRECONDITION_FAILED mean a queue declared with other arguments. The
        broker closes a channel with the same code for other reasons (a delivery held unacked past
        its consumer_timeout), and those are a reconnect, not a reason to stop."""
        try:
            self.topology.declare(channel)
        except PreconditionFailed as exc:
            raise _TopologyMismatch(exc.reply_text) from exc

    def stop(self, timeout: float = 60.0) -> None:
        """Stop taking messages, finish and ack those in flight, then close. Once: a second call
        returns (its fetch loop is already told to end)."""
        if self._draining:
            return
        self._draining = True
        self._stop_requested.set()
        if not self._stopped.wait(timeout):
            log.warning(
                "queue consumer: %d messages still in flight at shutdown; the broker redelivers them", len(self._held)
            )
            self.should_stop = True
            self._stopped.wait(5)
        self._io.shutdown(wait=False, cancel_futures=True)

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self.fetcher.close(), self._loop).result(5)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self.connection.release()

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "queue": self.topology.queue_name,
            "prefetch": self.prefetch,
            "in_flight": len(self._held),
            **self.counts,
            "last_error": self.last_error,
        }

    # -- kombu hooks (consumer thread) ------------------------------------------------------

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        # One consumer per queue, each with its own prefetch window: a bulk backlog holding all of
        # its window never keeps a gateway's request waiting in the broker.
        return [
            consumer_cls(
                queues=[self.topology.interactive_queue],
                on_message=partial(self._on_message, interactive=True),
                prefetch_count=self.prefetch,
                accept=None,
            ),
            consumer_cls(
                queues=[self.topology.request_queue],
                on_message=self._on_message,
                prefetch_count=self.prefetch,
                accept=None,
            ),
        ]

    def on_connection_revived(self) -> None:
        # Deliveries from a dead channel cannot be acked on the new one: the broker has
        # requeued them already, so forget them (their results are in the store).
        self._gen += 1
        self._held.clear()
        self._retries.clear()

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._declare(channel)
        self._consumers = list(consumers)
        if self.state != "connected":
            log.info("queue consumer connected to %s, consuming %s", connection.as_uri(), self.topology.queue_name)
        self.state = "connected"

    def on_connection_error(self, exc: BaseException, interval: float) -> None:
        self.counts["reconnects"] += 1
        self.state = "reconnecting"
        self.last_error = f"broker: {exc}"
        if "acknowledgement" in str(exc) and "timed out" in str(exc):
            # Messages held past the broker's consumer_timeout (30 min by default) while the store
            # was down: the broker took them back and will deliver them again. Nothing is lost.
            log.warning(
                "the broker took back the messages held unacknowledged past its consumer_timeout "
                "(waiting on the store or the model); they will be redelivered. Reconnecting in %.1fs",
                interval,
            )
            return
        log.warning("broker connection failed (%s); retrying in %.1fs", exc, interval)

    def on_iteration(self) -> None:
        while True:
            try:
                held, outcome = self._done.get_nowait()
            except queue.Empty:
                break
            self._finish(held, outcome)
        now = time.monotonic()
        while self._retries and self._retries[0][0] <= now:
            _due, _seq, held = heapq.heappop(self._retries)
            if held.generation == self._gen:
                self._start(held)
        if self._draining:
            for consumer in self._consumers:
                with contextlib.suppress(Exception):
                    consumer.cancel()
            self._consumers = []
            if not self._held:
                self.should_stop = True

    # -- messages -------------------------------------------------------------------------

    def _on_message(self, message: Message, *, interactive: bool = False) -> None:
        held = _Held(message, self._gen, interactive=interactive)
        self._held[id(held)] = held
        try:
            held.request = parse_request(_body_bytes(message))
        except PermanentError as exc:
            held.error = exc
        self._start(held)

    def _record_failure(self, held: _Held, exc: PermanentError) -> None:
        """I/O thread: store a request that failed before captioning, then report it back."""
        ref = self._source_ref(held)
        request = CaptionRequest(Source.QUEUE, ref, _failure_key(held), self._settings(held.request))
        try:
            result = self.pipeline.record_failure(request, exc)
        except TransientError as err:
            self._done.put((held, _Outcome("retry", error=err.message)))
            return
        self._done.put((held, _Outcome("failed", result=result, error=exc.message)))

    def _settings(self, request: QueueRequest | None) -> GenerationSettings:
        if request is None:
            return self.generation
        return replace(self.generation, prompt=request.prompt, num_captions=request.num_captions)

    def _start(self, held: _Held) -> None:
        if held.error is not None:
            self._io.submit(self._record_failure, held, held.error)
        else:
            self._io.submit(self._work, held)

    def _work(self, held: _Held) -> None:
        """I/O thread: get the bytes, submit, and report back through `_done`."""
        request = held.request
        assert request is not None
        if request.deadline is not None and (late := time.time() - request.deadline) > 0:
            # Its gateway has answered 503 and the client retries on its own: captioning it now
            # would only make the requests queued behind it late as well.
            self._done.put((held, _Outcome("expired", error=f"{late:.1f}s")))
            return
        try:
            data = self._load(request)
            caption_request = CaptionRequest(
                Source.QUEUE,
                self._source_ref(held),
                data,
                self._settings(request),
                store=request.store,
                refresh=request.refresh,
                interactive=held.interactive,
            )
            future = self.pipeline.submit(caption_request, wait=True)
        except PermanentError as exc:
            self._record_failure(held, exc)
            return
        except TransientError as exc:
            self._done.put((held, _Outcome("retry", error=exc.message)))
            return
        except Exception as exc:
            log.exception("queue message failed before captioning")
            self._done.put((held, _Outcome("bug", error=str(exc))))
            return
        future.add_done_callback(lambda f: self._done.put((held, self._outcome(f))))

    def _load(self, request: QueueRequest) -> bytes:
        if request.kind == "image_b64":
            return decode_b64(request.value)
        if request.kind == "path":
            return read_path(request.value, self.file_roots, self.max_file_size).data
        return asyncio.run_coroutine_threadsafe(self.fetcher.fetch(request.value), self._loop).result()

    @staticmethod
    def _source_ref(held: _Held) -> str:
        request = held.request
        if request is not None and request.source_ref:  # what a gateway's HTTP request named
            return request.source_ref
        if request is not None and request.kind == "path":
            return request.value
        if request is not None and request.kind == "url":
            return public_url(request.value)
        message_id = held.message.properties.get("message_id")
        own_id = request.id if request is not None else peek_id(_body_bytes(held.message))
        return f"message:{own_id or message_id or held.message.delivery_tag}"

    @staticmethod
    def _outcome(future: Future[CaptionResult]) -> _Outcome:
        exc = future.exception()
        if isinstance(exc, TransientError):
            return _Outcome("retry", error=exc.message)
        if exc is not None:
            message = exc.message if isinstance(exc, CaptionError) else str(exc)
            return _Outcome("bug", error=message)
        result = future.result()
        return _Outcome("ok" if result.ok else "failed", result=result, error=result.error)

    def _finish(self, held: _Held, outcome: _Outcome) -> None:
        """Consumer thread: announce, then acknowledge (or retry, or dead-letter)."""
        if held.generation != self._gen:
            return  # delivered on a connection that is gone; the broker redelivers it
        message = held.message
        if outcome.kind == "retry":
            held.attempt += 1
            delay = self.backoff.delay(held.attempt)
            self.counts["retried"] += 1
            self.last_error = outcome.error
            self.metrics.queue_messages.labels("retried").inc()
            log.warning("queue message will be retried in %.1fs (attempt %d): %s", delay, held.attempt, outcome.error)
            heapq.heappush(self._retries, (time.monotonic() + delay, next(self._seq), held))
            return
        if outcome.kind == "expired":
            # Not captioned, not stored, not announced: nothing was done, and no one waits.
            message.ack()
            self._held.pop(id(held), None)
            self.counts["expired"] += 1
            self.metrics.queue_messages.labels("expired").inc()
            now = time.monotonic()
            if now - self._expired_logged >= 10:  # one line per 10 s, however long the backlog
                self._expired_logged = now
                log.warning(
                    "queue: dropped gateway requests past their deadline (%d so far, the last %s late; their "
                    "clients had a 503). If nearly every request is dropped, check that this host's clock "
                    "agrees with the gateway's (NTP)",
                    self.counts["expired"],
                    outcome.error,
                )
            return
        if outcome.kind == "bug" and not message.delivery_info.get("redelivered"):
            # A model or code failure: give it one more chance elsewhere before dead-lettering.
            self._held.pop(id(held), None)
            self.metrics.queue_messages.labels("requeued").inc()
            message.requeue()
            return
        echo = held.request.echo() if held.request else {"id": peek_id(_body_bytes(message))}
        ok = outcome.kind == "ok"
        body = queue_result(outcome.result, framework=self.pipeline.framework, request=echo, error=outcome.error)
        routing_key = "caption.succeeded" if ok else "caption.failed"
        self.producer.publish(
            body,
            exchange=self.topology.results_exchange,
            routing_key=routing_key,
            serializer="json",
            declare=[self.topology.results_exchange],
            retry=True,
            retry_policy=_PUBLISH_RETRY,
        )
        reply_to = message.properties.get("reply_to")
        if reply_to:
            self.producer.publish(
                body,
                exchange="",
                routing_key=reply_to,
                correlation_id=message.properties.get("correlation_id"),
                serializer="json",
                retry=True,
                retry_policy=_PUBLISH_RETRY,
            )
        if not ok:
            reason = outcome.error or "failed"
            self._dead_letter(message, reason)
            self.last_error = reason
            log.warning("queue message dead-lettered: %s", reason)
        message.ack()
        self._held.pop(id(held), None)
        self.counts["succeeded" if ok else "failed"] += 1
        self.metrics.queue_messages.labels("succeeded" if ok else "dead_lettered").inc()

    def _dead_letter(self, message: Message, reason: str) -> None:
        """The message as it came, with its properties and the reason in REASON_HEADER.

        The body goes as bytes, whatever it was (empty, not UTF-8, no content type): re-encoding
        it could fail and jam the queue behind it.
        """
        headers = dict(message.headers or {})
        headers[REASON_HEADER] = utf8_text(reason[:1000])  # read by clients in any language: valid UTF-8
        props = message.properties or {}
        kept = {name: props[name] for name in _KEPT_PROPERTIES if props.get(name) is not None}
        self.producer.publish(
            _body_bytes(message),
            exchange=self.topology.dead_exchange,
            routing_key=self.topology.queue_name,
            headers=headers,
            content_type=message.content_type or "application/octet-stream",
            content_encoding="binary",
            declare=[self.topology.dead_queue],
            retry=True,
            retry_policy=_PUBLISH_RETRY,
            **kept,
        )


class _TopologyMismatch(Exception):
    """The broker refused to declare the queue as this service declares it."""


# AMQP properties a dead-lettered copy keeps, so whoever reads the dead queue can match it up.
_KEPT_PROPERTIES = ("message_id", "correlation_id", "reply_to", "timestamp", "type", "app_id", "user_id")


def _body_bytes(message: Message) -> bytes:
    body = message.body
    if isinstance(body, bytes):
        return body
    return (body or "").encode("utf-8", "surrogateescape")


def _failure_key(held: _Held) -> bytes:
    """What identifies a failed message in the store: its body, else its message id."""
    body = _body_bytes(held.message)
    if body:
        return body
    message_id = (held.message.properties or {}).get("message_id")
    return f"message:{message_id}".encode() if message_id else b""
