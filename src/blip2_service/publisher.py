"""Sending requests to the queue: `blip2-service publish` and the watcher's publish mode."""

from __future__ import annotations

import base64
import contextlib
import logging
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kombu import Consumer, Producer

from .amqp_topology import (
    BrokerUnavailable,
    Topology,
    broker_errors,
    connect,
    reply_queue,
    too_large_for_broker,
    wait_for_broker,
)
from .config import Settings
from .domain import TooLarge, json_text
from .retry import PUBLISH, Backoff

log = logging.getLogger(__name__)


class QueuePublisher:
    """Thread-safe: one lock around one producer. A publish that meets a broker error drops the
    connection (the next attempt opens a fresh one) and tries again on `backoff`, `backoff.attempts`
    tries in all. The `publish` command waits out a short outage that way; the watcher makes one
    try, since it retries the file itself on the one backoff (and a stop need not wait behind it)."""

    def __init__(self, broker_url: str, topology: Topology, *, backoff: Backoff = PUBLISH) -> None:
        self.topology = topology
        self.backoff = backoff
        self._connection = connect(broker_url)
        self._errors = broker_errors(self._connection)
        self._lock = threading.Lock()
        self._producer: Producer | None = None

    def publish(
        self, request: dict[str, Any], *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        """Send one request; returns once the broker has it (publisher confirms), or raises
        BrokerUnavailable (one line) when the last try failed, or TooLarge at once when the broker
        refuses the message for its size."""
        message_id = str(uuid.uuid4())  # one id for every try (a lost confirm may mean the broker has it twice)
        attempt = 0
        while True:
            attempt += 1
            with self._lock:
                try:
                    self._producer_now().publish(
                        request,
                        exchange="",
                        routing_key=self.topology.queue_name,
                        serializer="json",
                        delivery_mode=2,
                        reply_to=reply_to,
                        correlation_id=correlation_id,
                        message_id=message_id,
                    )
                    return
                except self._errors as exc:
                    refused = too_large_for_broker(exc)
                    if refused is not None:
                        raise refused from None  # the channel lives on (py-amqp reopens it)
                    self._drop()
                    if self.backoff.gives_up_after(attempt):
                        tries = f" after {attempt} tries" if attempt > 1 else ""
                        raise BrokerUnavailable(
                            f"cannot publish to the broker at {self._connection.as_uri()}{tries}: {exc}; "
                            "check BROKER_URL and that RabbitMQ is up"
                        ) from exc
                    error = exc
            delay = self.backoff.delay(attempt)
            log.warning("publishing to the broker failed (%s); retrying in %.1fs", error, delay)
            time.sleep(delay)

    def _producer_now(self) -> Producer:
        if self._producer is None:
            self._connection.ensure_connection(max_retries=0)  # one attempt: `publish` owns the waiting
            channel = self._connection.channel()
            self.topology.declare(channel)
            self._producer = Producer(channel)
        return self._producer

    def _drop(self) -> None:
        """Forget a connection that failed: its channel is dead, and kombu would keep reusing it."""
        self._producer = None
        with contextlib.suppress(Exception):
            self._connection.collect()

    def close(self) -> None:
        with self._lock:
            self._connection.release()
            self._producer = None


class ReplyCollector:
    """`publish --wait`'s side of the RPC: one reply queue, read until every expected reply came
    or the deadline passed, across broker restarts.

    The queue was exclusive, so a broker restart (or a dropped connection) deleted it with every
    reply in it, and the lost connection raised out of the wait: a traceback, and not one result
    printed, not even those already received. It is a `reply_queue` now (replies sent meanwhile
    wait in it); a lost connection is reconnected on the one backoff until the deadline; the end
    deletes the queue.
    """

    def __init__(self, broker_url: str, timeout: float, *, backoff: Backoff = PUBLISH) -> None:
        self.queue = reply_queue("blip2.reply", timeout)
        self.results: dict[str, dict[str, Any]] = {}
        self._wanted: set[str] = set()
        self.backoff = backoff
        self._connection = connect(broker_url)
        self._errors = broker_errors(self._connection)
        self._consuming = False

    def start(self) -> None:
        """Declare the queue and consume it, before anything is published that replies to it;
        BrokerUnavailable (one line) if the broker went away since `wait_for_broker`."""
        try:
            self._consume()
        except self._errors as exc:
            raise BrokerUnavailable(
                f"cannot reach the broker at {self._connection.as_uri()} to wait for results: {exc}; "
                "check BROKER_URL and that RabbitMQ is up"
            ) from None

    def _consume(self) -> None:
        if not self._consuming:
            self._connection.ensure_connection(max_retries=0)
            Consumer(
                self._connection.channel(),
                queues=[self.queue],
                callbacks=[self._on_reply],
                on_decode_error=self._on_undecodable,
                accept=["json"],
            ).consume()
            self._consuming = True

    def expect(self, correlation: str) -> None:
        """A request sent with this correlation id: its reply is kept (any other is dropped)."""
        self._wanted.add(correlation)

    def _on_reply(self, body: Any, message: Any) -> None:
        unreadable = {"status": "error", "error": {"message": "the worker's reply is not a JSON object"}}
        self._keep(message, body if isinstance(body, dict) else unreadable)

    def _on_undecodable(self, message: Any, error: Exception) -> None:
        self._keep(message, {"status": "error", "error": {"message": f"the worker's reply could not be read: {error}"}})

    def _keep(self, message: Any, body: dict[str, Any]) -> None:
        correlation = message.properties.get("correlation_id") or ""
        if correlation in self._wanted:
            self.results.setdefault(correlation, body)  # a redelivered request's second reply: the first stands
        message.ack()

    def wait(self, deadline: float, progress: Any = None) -> None:
        """Until every expected reply came or the monotonic `deadline` passed."""
        attempt = 0
        while len(self.results) < len(self._wanted) and (left := deadline - time.monotonic()) > 0:
            try:
                self._consume()
                with contextlib.suppress(TimeoutError, socket.timeout):
                    self._connection.drain_events(timeout=min(0.5, left))
                attempt = 0
            except self._errors as exc:
                self._consuming = False
                with contextlib.suppress(Exception):
                    self._connection.collect()  # its channel is dead; the next attempt opens a fresh one
                attempt += 1
                delay = min(self.backoff.delay(attempt), max(0.0, deadline - time.monotonic()))
                log.warning("waiting for results: lost the broker (%s); reconnecting in %.1fs", exc, delay)
                time.sleep(delay)
            if progress is not None:
                progress(len(self.results))

    def close(self) -> None:
        """Delete the queue (no one waits on it now) and let go of the connection; best effort."""
        with contextlib.suppress(Exception):
            if self._consuming:
                self.queue(self._connection.channel()).delete()
        with contextlib.suppress(Exception):
            self._connection.release()


def publish_paths(
    settings: Settings,
    files: list[Path],
    *,
    embed: bool,
    wait: bool,
    prompt: str | None,
    timeout: float,
) -> int:
    """The `publish` command: send every file; with `wait`, print each result as a JSON line."""
    from tqdm import tqdm

    wait_for_broker(settings.broker_url, settings.startup_timeout)  # as serve and consume do
    topology = Topology(settings.queue_name, settings.results_exchange)
    publisher = QueuePublisher(settings.broker_url, topology)
    expected: dict[str, Path] = {}
    replies = ReplyCollector(settings.broker_url, timeout) if wait else None
    failures = 0
    try:
        if replies is not None:
            replies.start()
        with tqdm(total=len(files), unit="img", desc="published", file=sys.stderr, disable=None) as bar:
            for path in files:
                request: dict[str, Any] = {"id": str(path)}
                if embed:
                    request["image_b64"] = base64.b64encode(path.read_bytes()).decode()
                else:
                    request["path"] = str(path.resolve())
                if prompt:
                    request["prompt"] = prompt
                correlation = uuid.uuid4().hex
                try:
                    publisher.publish(
                        request, reply_to=replies.queue.name if replies else None, correlation_id=correlation
                    )
                except TooLarge as exc:  # this file only: say so in the results' shape, send the rest
                    failures += 1
                    refused = {"path": str(path), "status": "error", "error": {"message": exc.message}}
                    print(json_text(refused), flush=True)
                else:
                    expected[correlation] = path
                    if replies is not None:
                        replies.expect(correlation)
                bar.update()
        if replies is None:
            return 1 if failures else 0
        deadline = time.monotonic() + timeout
        with tqdm(total=len(expected), unit="img", desc="results", file=sys.stderr, disable=None) as bar:
            replies.wait(deadline, progress=lambda n: bar.update(n - bar.n))
        for correlation, path in expected.items():
            body = replies.results.get(correlation)
            if body is None:
                failures += 1
                print(json_text({"path": str(path), "status": "timeout"}), flush=True)
                continue
            failures += 0 if body.get("status") == "success" else 1
            print(json_text({"path": str(path), **body}), flush=True)
        return 1 if failures else 0
    finally:
        if replies is not None:
            replies.close()
        publisher.close()
