"""Gateway mode (INFERENCE=queue): the HTTP edge without a model, captioning through GPU workers.

Each analyze request passes the edge's guards here (paths, URLs, sizes, prompts: intake), then
travels to the queue as an RPC: the image bytes embedded (`image_b64`), `reply_to` this process's
own reply queue and a `correlation_id`. Whichever worker takes it captions and stores it (the
shared Postgres) and replies; the handler answers with the legacy JSON. No reply within
GATEWAY_TIMEOUT is a 503 with Retry-After: HTTP capacity grows with the number of workers, on any
number of hosts.

One thread owns the AMQP connection (kombu channels are not thread-safe): handlers hand it
requests through a queue and wait on futures it resolves from the replies.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import queue
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from typing import Any

from kombu import Consumer, Producer

from .amqp_topology import POLL_SECONDS, Topology, connect, reply_queue, too_large_for_broker
from .domain import (
    CaptionError,
    CaptionRequest,
    CaptionResult,
    EmojiMapping,
    ModelNotReady,
    Overloaded,
    Prediction,
)
from .metrics import Metrics
from .retry import WORK, Backoff

log = logging.getLogger(__name__)

# After this gateway (re)connects, how long a count of no workers is not yet "no worker": after a
# broker restart the workers reconnect on their own backoff (their first retry after 1 s), and
# until they do, requests wait for them in the queue instead of a 503 naming a missing worker.
WORKER_RECONNECT_GRACE = 5.0


class WorkerReplyUnreadable(CaptionError):
    """A worker answered with a body this gateway cannot read: a 502 (Bad Gateway), for what it is."""

    status = 502

    def __init__(self, cause: Exception) -> None:
        super().__init__(
            f"A worker's reply could not be read ({cause}); check that the workers run the gateway's version"
        )


class QueueGateway:
    name = "gateway"

    def __init__(
        self,
        broker_url: str,
        topology: Topology,
        *,
        timeout: float,
        max_pending: int = 256,
        backoff: Backoff = WORK,
        metrics: Metrics | None = None,
    ) -> None:
        self.topology = topology
        self.metrics = metrics or Metrics()
        self.timeout = timeout
        self.max_pending = max_pending
        self.backoff = backoff
        self._connection = connect(broker_url)
        # A reply sent while this gateway reconnects, or across a broker restart, waits there;
        # a clean stop deletes it.
        self._reply_queue = reply_queue("blip2.gateway", timeout)
        self._outbox: queue.Queue[tuple[dict[str, Any], str]] = queue.Queue()
        # the request being published: kept until the broker took it, so one whose publish met a
        # dropped connection is sent on the next, not left to wait out GATEWAY_TIMEOUT
        self._unsent: tuple[dict[str, Any], str] | None = None
        # correlation id -> (the reply's future, when it was sent); given up on GATEWAY_TIMEOUT later
        self._waiting: dict[str, tuple[Future[CaptionResult], float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._connected_at = 0.0
        self._thread = threading.Thread(target=self._run, name="gateway", daemon=True)
        self.workers = 0
        self.state = "connecting"
        self.last_error: str | None = None
        self.reconnects = 0

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        with self._lock:
            for future, _sent in self._waiting.values():
                if not future.done():
                    self.metrics.gateway_requests.labels("shutdown").inc()
                    future.set_exception(ModelNotReady("The gateway is shutting down; retry", retry_after=5))
            self._waiting.clear()
        self._connection.release()

    @property
    def pending(self) -> int:
        """Requests sent (or about to be) and not yet answered: what /health and blip2_pending say here."""
        return len(self._waiting)

    def health(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "queue": self.topology.interactive_name,
            "workers": self.workers,
            "waiting": self.pending,
            "reconnects": self.reconnects,
            "last_error": self.last_error,
        }

    # -- requests (any thread) --------------------------------------------------------------

    def submit(self, request: CaptionRequest) -> Future[CaptionResult]:
        """Send one request; the future resolves to the worker's result, or to ModelNotReady
        (a TransientError: 503 with Retry-After) when no worker answers within GATEWAY_TIMEOUT.
        Raises ModelNotReady at once while the broker is out of reach or no worker consumes, and
        Overloaded while MAX_PENDING requests wait on the workers."""
        correlation = uuid.uuid4().hex
        reply: Future[CaptionResult] = Future()
        with self._lock:
            self.ensure_ready()
            self._waiting[correlation] = (reply, time.monotonic())
        settings = request.settings
        body: dict[str, Any] = {
            "image_b64": base64.b64encode(request.data).decode(),
            "id": f"http:{correlation}",
            "source_ref": request.source_ref,
            "num_captions": settings.num_captions,
            "store": request.store,
            "refresh": request.refresh,
            # When this gateway answers 503 instead: a worker that takes the request after it
            # (a backlog behind a slow or restarted worker) drops it rather than spend the GPU on
            # an answer no one waits for while the requests behind it time out in turn.
            "deadline": time.time() + self.timeout,
        }
        if settings.prompt:
            body["prompt"] = settings.prompt
        self._outbox.put((body, correlation))
        return reply

    def ensure_ready(self) -> None:
        """Raise what `submit` would refuse with: lets a door refuse before reading the upload.
        Counted here: a request is refused by its first call that raises, and only once."""
        if self.state == "reconnecting":  # would only wait out GATEWAY_TIMEOUT: say why, at once
            self.metrics.gateway_requests.labels("refused_no_broker").inc()
            raise ModelNotReady(
                f"The gateway cannot reach the broker ({self.last_error}); retry shortly",
                retry_after=max(1.0, min(self.timeout, 5.0)),
            )
        if (
            self.workers == 0
            and self._ready.is_set()
            and time.monotonic() - self._connected_at > WORKER_RECONNECT_GRACE
        ):
            self.metrics.gateway_requests.labels("refused_no_worker").inc()
            raise ModelNotReady(
                f"No worker is consuming {self.topology.interactive_name}; start `blip2-service consume` on a GPU host",
                retry_after=10,
            )
        # MAX_PENDING, as in serve: without it a burst put every request it brought on the queue,
        # and the workers went on captioning requests whose clients had long had their 503,
        # while every new one waited behind them and timed out in turn.
        if self.pending >= self.max_pending:
            self.metrics.gateway_requests.labels("refused_overloaded").inc()
            raise Overloaded(
                f"The gateway is overloaded ({self.max_pending} requests waiting on the workers, "
                "MAX_PENDING); retry shortly",
                retry_after=1,
            )

    def _expire_overdue(self) -> None:
        """Fail the requests no worker answered within GATEWAY_TIMEOUT (the AMQP thread's loop
        calls this; one clock for all of them, not a timer thread each)."""
        sent_by = time.monotonic() - self.timeout
        with self._lock:
            overdue = [c for c, (_f, sent) in self._waiting.items() if sent <= sent_by]
        for correlation in overdue:
            self._refuse(
                correlation,
                "timeout",
                ModelNotReady(
                    f"No worker answered within GATEWAY_TIMEOUT={self.timeout:g}s; the workers are busy or "
                    "gone, retry shortly",
                    retry_after=max(1.0, self.timeout / 2),
                ),
            )

    # -- the AMQP thread ------------------------------------------------------------------

    def _run(self) -> None:
        """Serve one connection at a time; between them wait on the one backoff, still failing
        overdue requests every second and seeing a stop at once."""
        attempt = 0
        while not self._stop.is_set():
            try:
                self._serve()
            except Exception as exc:  # the connection dropped: reconnect, waiting requests time out
                attempt = 1 if self.state == "connected" else attempt + 1
                delay = self.backoff.delay(attempt)
                self.reconnects += 1
                self.state = "reconnecting"
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("gateway: broker connection failed (%s); retrying in %.1fs", exc, delay)
                deadline = time.monotonic() + delay
                while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                    self._expire_overdue()
                    self._stop.wait(min(1.0, left))

    def _serve(self) -> None:
        with self._connection.clone() as conn:
            conn.ensure_connection(max_retries=0)  # one attempt: `_run` waits, and sees a stop
            channel = conn.channel()
            self.topology.declare(channel)
            producer = Producer(conn.channel())
            consumer = Consumer(
                channel,
                queues=[self._reply_queue],
                callbacks=[self._on_reply],
                on_decode_error=self._on_undecodable,
                accept=["json"],
            )
            consumer.consume()
            self.state = "connected"
            self._connected_at = time.monotonic()
            next_count = next_expiry = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= next_count:
                    self.workers = self._consumer_count(conn)
                    self._ready.set()
                    next_count = now + 2.0
                self._send_pending(producer)
                if now >= next_expiry:  # a scan of every waiting request: ten a second, not one a frame
                    self._expire_overdue()
                    next_expiry = now + 0.1
                with contextlib.suppress(TimeoutError, socket.timeout):
                    conn.drain_events(timeout=POLL_SECONDS)
            with contextlib.suppress(Exception):  # stopping: no reply can reach anyone now
                self._reply_queue(channel).delete()

    def _consumer_count(self, conn: Any) -> int:
        declared = conn.channel()
        try:
            _name, _messages, consumers = declared.queue_declare(self.topology.interactive_name, passive=True)
            return int(consumers)
        finally:
            with contextlib.suppress(Exception):
                declared.close()

    def _send_pending(self, producer: Producer) -> None:
        while True:
            if self._unsent is None:
                try:
                    self._unsent = self._outbox.get_nowait()
                except queue.Empty:
                    return
            body, correlation = self._unsent
            with self._lock:
                wanted = correlation in self._waiting
            if not wanted:  # answered (expired, refused) while it waited to be sent
                self._unsent = None
                continue
            try:
                producer.publish(
                    body,
                    exchange="",
                    routing_key=self.topology.interactive_name,
                    serializer="json",
                    delivery_mode=2,
                    reply_to=self._reply_queue.name,
                    correlation_id=correlation,
                    message_id=correlation,
                )
            except Exception as exc:
                # Over the broker's max_message_size: that request's 413, at once (not a
                # GATEWAY_TIMEOUT later), and the connection, with everyone else's replies, lives on.
                refused = too_large_for_broker(exc)
                if refused is None:
                    raise  # the connection failed: `_unsent` goes first on the next one
                self._refuse(correlation, "too_large", refused)
            self._unsent = None

    def _claim(self, correlation: str) -> tuple[Future[CaptionResult], float] | None:
        """Take one request off the waiting list: its future and when it was sent, or None when it
        is answered already."""
        with self._lock:
            waiting = self._waiting.pop(correlation, None)
        return None if waiting is None or waiting[0].done() else waiting

    def _refuse(self, correlation: str, outcome: str, error: Exception) -> None:
        """Answer one waiting request with `error` (its reply, should one come, is then ignored)."""
        if (claimed := self._claim(correlation)) is not None:
            self.metrics.gateway_requests.labels(outcome).inc()
            claimed[0].set_exception(error)

    def _on_reply(self, body: Any, message: Any) -> None:
        self._answer(message, body, None)

    def _on_undecodable(self, message: Any, error: Exception) -> None:
        """A reply that is not JSON. Without this hook kombu raised out of `drain_events`: the
        gateway took it for a dropped connection, the reply came back on the next one, and the
        gateway reconnected for ever, answering no one."""
        self._answer(message, None, error)

    def _answer(self, message: Any, body: Any, error: Exception | None) -> None:
        """Ack a reply and answer its request: the worker's result, or a 502 when the reply cannot
        be read (a worker of another version, or not ours): one line at once, not a wait until
        the client gives up (the request is off the list, so nothing else would answer it)."""
        message.ack()
        claimed = self._claim(message.properties.get("correlation_id") or "")
        if claimed is None:
            return
        future, sent = claimed
        if error is None:
            try:
                result = result_from_reply(body)
            except (TypeError, KeyError, ValueError, AttributeError) as exc:
                error = exc
            else:
                self.metrics.gateway_requests.labels("answered").inc()
                self.metrics.gateway_seconds.observe(time.monotonic() - sent)
                future.set_result(result)
                return
        log.warning("gateway: unreadable reply from a worker (%s: %s)", type(error).__name__, error)
        self.metrics.gateway_requests.labels("unreadable").inc()
        future.set_exception(WorkerReplyUnreadable(error))


def result_from_reply(body: Any) -> CaptionResult:
    """A worker's queue result (the legacy body plus record_id, image_sha256, error_status) as a
    result; TypeError, KeyError, ValueError or AttributeError for a body not of that shape."""
    if not isinstance(body, dict):
        raise TypeError(f"the reply is a JSON {type(body).__name__}, not an object")
    metadata = body.get("metadata") or {}
    model = (metadata.get("model_info") or {}).get("name", "")
    if body.get("status") == "success":
        predictions = [
            Prediction(p["text"], tuple(EmojiMapping(m["emoji"], m["word"]) for m in p.get("emoji_mappings", [])))
            for p in body.get("predictions", [])
        ]
        return CaptionResult(
            status="succeeded",
            model=model,
            predictions=predictions,
            processing_time=float(metadata.get("processing_time", 0.0)),
            image_sha256=body.get("image_sha256"),
            record_id=body.get("record_id"),
            cached=bool(metadata.get("cached", False)),
        )
    return CaptionResult(
        status="failed",
        model=model,
        predictions=[],
        processing_time=float(metadata.get("processing_time", 0.0)),
        image_sha256=body.get("image_sha256"),
        record_id=body.get("record_id"),
        error=(body.get("error") or {}).get("message") or "failed",
        error_status=int(body.get("error_status") or 422),
    )
