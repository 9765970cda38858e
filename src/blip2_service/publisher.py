"""Sending requests to the queue: `blip2-service publish` and the watcher's publish mode."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from kombu import Consumer, Producer, Queue

from .amqp_topology import Topology, connect
from .config import Settings

log = logging.getLogger(__name__)


class QueuePublisher:
    """Thread-safe: one lock around one producer, reconnecting (with retries) when the broker drops."""

    def __init__(self, broker_url: str, topology: Topology) -> None:
        self.topology = topology
        self._connection = connect(broker_url)
        self._lock = threading.Lock()
        self._producer: Producer | None = None

    def _get_producer(self) -> Producer:
        if self._producer is None:
            self._connection.ensure_connection(max_retries=5)
            channel = self._connection.channel()
            self.topology.declare(channel)
            self._producer = Producer(channel)
        return self._producer

    def publish(
        self, request: dict[str, Any], *, reply_to: str | None = None, correlation_id: str | None = None
    ) -> None:
        with self._lock:
            producer = self._get_producer()
            publish = self._connection.ensure(
                producer,
                producer.publish,
                max_retries=5,
                interval_start=0.5,
                interval_step=1,
                interval_max=5,
            )
            publish(
                request,
                exchange="",
                routing_key=self.topology.queue_name,
                serializer="json",
                delivery_mode=2,
                reply_to=reply_to,
                correlation_id=correlation_id,
                message_id=str(uuid.uuid4()),
            )

    def close(self) -> None:
        with self._lock:
            self._connection.release()
            self._producer = None


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

    topology = Topology(settings.queue_name, settings.results_exchange)
    publisher = QueuePublisher(settings.broker_url, topology)
    reply_queue: Queue | None = None
    results: dict[str, dict[str, Any]] = {}
    expected: dict[str, Path] = {}
    connection = connect(settings.broker_url) if wait else None
    consumer: Consumer | None = None
    if connection is not None:
        reply_queue = Queue(
            f"blip2.reply.{socket.gethostname()}.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True
        )

        def on_reply(body: Any, message: Any) -> None:
            correlation = message.properties.get("correlation_id")
            results[correlation] = body if isinstance(body, dict) else json.loads(body)
            message.ack()

        consumer = Consumer(connection.channel(), queues=[reply_queue], callbacks=[on_reply], accept=["json"])
        consumer.consume()
    failures = 0
    try:
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
                expected[correlation] = path
                publisher.publish(
                    request, reply_to=reply_queue.name if reply_queue else None, correlation_id=correlation
                )
                bar.update()
        if connection is None:
            return 0
        deadline = time.monotonic() + timeout
        with tqdm(total=len(files), unit="img", desc="results", file=sys.stderr, disable=None) as bar:
            while len(results) < len(expected) and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    connection.drain_events(timeout=0.5)
                bar.update(len(results) - bar.n)
        for correlation, path in expected.items():
            body = results.get(correlation)
            if body is None:
                failures += 1
                print(json.dumps({"path": str(path), "status": "timeout"}), flush=True)
                continue
            failures += 0 if body.get("status") == "success" else 1
            print(json.dumps({"path": str(path), **body}, ensure_ascii=False), flush=True)
        return 1 if failures else 0
    finally:
        if consumer is not None:
            consumer.cancel()
        if connection is not None:
            connection.release()
        publisher.close()
