"""The queue consumer against the real RabbitMQ, the real tiny-random model and a real store."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kombu import Connection, Consumer, Queue
from sqlalchemy import func, select
from sqlalchemy.engine import make_url

from blip2_service.amqp_topology import Topology
from blip2_service.consumer import QueueConsumer
from blip2_service.domain import CaptionRequest, GenerationSettings, ModelNotReady, Source
from blip2_service.fetching import UrlFetcher
from blip2_service.intake import AddressPolicy
from blip2_service.pipeline import CaptionPipeline
from blip2_service.publisher import QueuePublisher
from blip2_service.queue_protocol import REASON_HEADER
from blip2_service.retry import Backoff
from blip2_service.store import CaptionFilter, CaptionRepository, make_engine, upgrade
from blip2_service.store.tables import captions

from ..conftest import AMQP_URL, delete_topology, image_bytes, port_open, service_missing, wait_until
from ..tcp_proxy import TcpProxy

FAST = GenerationSettings(num_beams=1, max_new_tokens=4)


def _count(store: CaptionRepository) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(captions)).scalar_one())


@pytest.fixture(scope="session")
def broker() -> str:
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    return AMQP_URL


class Results:
    """Collects what the service announces on the results exchange."""

    def __init__(self, url: str, topology: Topology) -> None:
        self.connection = Connection(url)
        self.items: list[tuple[str, dict[str, Any]]] = []
        channel = self.connection.channel()
        topology.declare(channel)
        self.queue = Queue(
            f"{topology.queue_name}.test-results",
            exchange=topology.results_exchange,
            routing_key="caption.#",
            auto_delete=True,
        )
        self.consumer = Consumer(channel, queues=[self.queue], callbacks=[self._on], accept=["json"])
        self.consumer.consume()

    def _on(self, body: Any, message: Any) -> None:
        self.items.append((message.delivery_info["routing_key"], body))
        message.ack()

    def wait(self, n: int, timeout: float = 120) -> list[tuple[str, dict[str, Any]]]:
        deadline = time.monotonic() + timeout
        while len(self.items) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=0.2)
        return self.items

    def close(self) -> None:
        self.connection.release()


@pytest.fixture
def topology(broker: str) -> Iterator[Topology]:
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    topo = Topology(name, f"{name}.results")
    yield topo
    delete_topology(broker, name, f"{name}.test-results")


@pytest.fixture
def results(broker: str, topology: Topology) -> Iterator[Results]:
    collector = Results(broker, topology)
    yield collector
    collector.close()


@pytest.fixture
def publisher(broker: str, topology: Topology) -> Iterator[QueuePublisher]:
    pub = QueuePublisher(broker, topology)
    yield pub
    pub.close()


@pytest.fixture
def start_consumer(
    broker: str, topology: Topology, make_pipeline: Callable[..., CaptionPipeline]
) -> Iterator[Callable[..., QueueConsumer]]:
    made: list[QueueConsumer] = []

    def start(store: CaptionRepository | None, prefetch: int = 32, **kw: Any) -> QueueConsumer:
        consumer = QueueConsumer(
            broker,
            pipeline=make_pipeline(store, max_pending=128, batch_max_size=16),
            topology=topology,
            prefetch=prefetch,
            generation=FAST,
            max_file_size=10_000_000,
            fetcher=UrlFetcher(timeout=5, max_bytes=10_000_000, policy=AddressPolicy(allow_private=True)),
            backoff=Backoff(0.2, 1.0),
            **kw,
        )
        consumer.start()
        made.append(consumer)
        return consumer

    yield start
    for consumer in made:
        consumer.stop(timeout=30)


def _proxied(broker: str) -> tuple[TcpProxy, str]:
    """A started TCP proxy to RabbitMQ that the test can cut, and the broker URL through it."""
    real = urlsplit(broker)
    proxy = TcpProxy(real.hostname or "127.0.0.1", real.port or 5672)
    proxy.start()
    return proxy, f"amqp://guest:guest@127.0.0.1:{proxy.port}//"


def _cut_consumer(url: str, pipeline: CaptionPipeline, topology: Topology, backoff: Backoff) -> QueueConsumer:
    """A consumer behind `_proxied`'s URL (not started)."""
    return QueueConsumer(
        url,
        pipeline=pipeline,
        topology=topology,
        prefetch=4,
        generation=FAST,
        max_file_size=10_000_000,
        fetcher=UrlFetcher(timeout=5, max_bytes=10_000_000),
        backoff=backoff,
    )


def _queue_depth(url: str, name: str) -> int:
    with Connection(url) as conn:
        _name, count, _consumers = conn.channel().queue_declare(name, passive=True)
        return int(count)


def _queue_consumers(url: str, name: str) -> int:
    """Consumers subscribed to a queue; 0 before any of them has declared it."""
    from amqp.exceptions import NotFound

    try:
        with Connection(url) as conn:
            _name, _count, consumers = conn.channel().queue_declare(name, passive=True)
            return int(consumers)
    except NotFound:
        return 0


def test_a_hundred_requests_are_stored_and_announced_and_rpc_replies_match(
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
    tmp_path: Path,
) -> None:
    start_consumer(sqlite_store, file_roots=[tmp_path.resolve()])
    for i in range(100):
        if i % 2:
            request = {"id": f"r{i}", "image_b64": base64.b64encode(image_bytes(500 + i)).decode()}
        else:
            path = tmp_path / f"{i}.jpg"
            path.write_bytes(image_bytes(500 + i))
            request = {"id": f"r{i}", "path": str(path)}
        publisher.publish(request)
    items = results.wait(100)
    assert len(items) == 100
    assert {key for key, _ in items} == {"caption.succeeded"}
    assert {body["request"]["id"] for _, body in items} == {f"r{i}" for i in range(100)}
    assert all(body["record_id"] and body["image_sha256"] and body["predictions"][0]["text"] for _, body in items)
    wait_until(lambda: _count(sqlite_store) == 100, 30, "100 stored captions")
    wait_until(lambda: _queue_depth(broker, topology.queue_name) == 0, 30, "an empty queue")

    # RPC: reply_to + correlation_id
    with Connection(broker) as conn:
        reply = Queue(f"reply.{uuid.uuid4().hex[:8]}", exclusive=True, auto_delete=True)
        got: list[tuple[str, dict[str, Any]]] = []
        consumer = Consumer(
            conn.channel(),
            queues=[reply],
            accept=["json"],
            callbacks=[lambda b, m: (got.append((m.properties["correlation_id"], b)), m.ack())],
        )
        consumer.consume()
        publisher.publish(
            {"id": "rpc", "image_b64": base64.b64encode(image_bytes(999)).decode()},
            reply_to=reply.name,
            correlation_id="corr-42",
        )
        deadline = time.monotonic() + 60
        while not got and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                conn.drain_events(timeout=0.5)
    assert got and got[0][0] == "corr-42"
    assert got[0][1]["status"] == "success" and got[0][1]["request"]["id"] == "rpc"


def test_bad_requests_are_dead_lettered_with_a_reason_and_announced(
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
    tmp_path: Path,
) -> None:
    consumer = start_consumer(sqlite_store, file_roots=[tmp_path.resolve()])
    bad_bytes = image_bytes(77, size=(200, 200))[:1500]
    with Connection(broker) as conn:
        producer = conn.Producer()
        producer.publish(
            b"this is not json",
            exchange="",
            routing_key=topology.queue_name,
            content_type="text/plain",
            content_encoding="utf-8",
        )
    cases = [
        {"id": "none"},
        {"id": "both", "path": "/a.jpg", "url": "http://example.com/a.jpg"},
        {"id": "missing", "path": str(tmp_path / "nope.jpg")},
        {"id": "undecodable", "image_b64": base64.b64encode(bad_bytes).decode()},
        {"id": "not-base64", "image_b64": "%%%"},
        {"id": "refused-url", "url": "ftp://example.com/a.jpg"},
    ]
    for case in cases:
        publisher.publish(case)
    items = results.wait(7, timeout=60)
    assert len(items) == 7
    assert {key for key, _ in items} == {"caption.failed"}
    assert all(body["status"] == "error" and body["error"]["message"] for _, body in items)

    dead: list[tuple[dict[str, Any], bytes]] = []
    with Connection(broker) as conn:
        channel = conn.channel()
        while True:
            message = channel.basic_get(topology.dead_name, no_ack=True)
            if message is None:
                break
            dead.append((message.headers, message.body))
    assert len(dead) == 7
    reasons = {headers[REASON_HEADER] for headers, _ in dead}
    assert any("not JSON" in r for r in reasons)
    assert any("Exactly one of path, url, image_b64" in r for r in reasons)
    assert any("File not found" in r for r in reasons)
    assert any("cannot be decoded" in r for r in reasons)
    assert any("not valid base64" in r for r in reasons)
    # every one is stored as failed with its reason: nothing accepted vanishes without a record
    failed, _ = sqlite_store.query(CaptionFilter(status="failed"))
    assert len(failed) == 7 and {item["source"] for item in failed} == {"queue"}
    assert {item["error"] for item in failed} == reasons
    assert {item["source_ref"] for item in failed} >= {"message:none", "message:both", str(tmp_path / "nope.jpg")}
    # and the consumer is still running
    publisher.publish({"id": "after", "image_b64": base64.b64encode(image_bytes(78)).decode()})
    items = results.wait(8, timeout=60)
    assert items[-1][0] == "caption.succeeded"
    assert consumer.health()["state"] == "connected"


def test_text_utf8_cannot_carry_is_stored_spelled_out_and_a_prompt_the_model_cannot_read_fails_alone(
    start_consumer: Callable[..., QueueConsumer],
    store: CaptionRepository,
    results: Results,
    broker: str,
    topology: Topology,
    tmp_path: Path,
) -> None:
    folder = (tmp_path / "in").resolve()
    folder.mkdir()
    (folder / "a.jpg").write_bytes(image_bytes(81))
    start_consumer(store, file_roots=[folder])

    def b64(seed: int) -> str:
        return base64.b64encode(image_bytes(seed)).decode()

    # json.dumps writes a lone surrogate as the escape "\\ud800", as any client might send it.
    bodies = [
        {"id": "good", "image_b64": b64(82)},
        {"id": "prompt", "path": f"{folder}/a.jpg", "prompt": "a \ud800 photo of"},
        {"id": "id-\ud800\x00", "image_b64": b64(83)},
        {"id": "path", "path": f"{folder}/\udcff.jpg"},
    ]
    with Connection(broker) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(
                json.dumps(body).encode(),
                routing_key=topology.queue_name,
                content_type="application/json",
                content_encoding="utf-8",
            )
    items = results.wait(4, timeout=60)
    assert sorted(key for key, _ in items) == ["caption.failed"] * 2 + ["caption.succeeded"] * 2
    rows = {item["source_ref"]: item for item in store.query(CaptionFilter())[0]}
    assert rows["message:good"]["status"] == "succeeded"
    assert rows[r"message:id-\ud800\x00"]["status"] == "succeeded"
    assert rows["message:prompt"]["error"] == "prompt holds a NUL or a lone surrogate; send it as plain UTF-8 text"
    assert rows[rf"{folder}/\xff.jpg"]["error"] == rf"File not found: {folder}/\xff.jpg"
    dead: list[Any] = []

    def both_dead_lettered() -> bool:  # dead-lettered just after the result is announced
        dead.extend(_dead_letters(broker, topology))
        return len(dead) >= 2

    wait_until(both_dead_lettered, 30, "both failures dead-lettered")
    assert rf"File not found: {folder}/\xff.jpg" in {message.headers[REASON_HEADER] for message in dead}


def _dead_letters(broker: str, topology: Topology) -> list[Any]:
    out = []
    with Connection(broker) as conn:
        channel = conn.channel()
        while (message := channel.basic_get(topology.dead_name, no_ack=True)) is not None:
            out.append(message)
    return out


def test_an_empty_message_is_dead_lettered_once_and_the_ten_behind_it_are_captioned(
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
) -> None:
    """A zero-length body once jammed the queue (dead-lettering re-encoded it as 'binary')."""
    consumer = start_consumer(sqlite_store)
    with Connection(broker) as conn:
        conn.Producer().publish(b"", exchange="", routing_key=topology.queue_name, message_id="empty-1")
    for i in range(10):
        publisher.publish({"id": f"good{i}", "image_b64": base64.b64encode(image_bytes(900 + i)).decode()})
    items = results.wait(11, timeout=90)
    keys = [key for key, _ in items]
    assert keys.count("caption.failed") == 1 and keys.count("caption.succeeded") == 10
    wait_until(lambda: consumer.health()["in_flight"] == 0, 30, "every message acknowledged")
    assert len(_dead_letters(broker, topology)) == 1
    stored, _ = sqlite_store.query(CaptionFilter(status="succeeded"))
    assert len(stored) == 10
    failed, _ = sqlite_store.query(CaptionFilter(status="failed"))
    assert [f["source_ref"] for f in failed] == ["message:empty-1"]
    health = consumer.health()
    assert health["state"] == "connected" and health["reconnects"] == 0
    with Connection(broker) as conn:  # nothing left unacknowledged on the queue
        assert conn.SimpleQueue(topology.request_queue).qsize() == 0


def test_a_path_outside_the_roots_and_a_missing_file_are_stored_failed_and_announced(
    start_consumer: Callable[..., QueueConsumer],
    store: CaptionRepository,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(image_bytes(31))
    start_consumer(store, file_roots=[inbox.resolve()])
    publisher.publish({"id": "outside", "path": str(secret)})
    publisher.publish({"id": "missing", "path": str(inbox / "gone.jpg")})
    items = results.wait(2, timeout=60)
    assert [key for key, _ in items] == ["caption.failed", "caption.failed"]
    by_id = {body["request"]["id"]: body for _, body in items}
    assert "outside the allowed folders" in by_id["outside"]["error"]["message"]
    assert "File not found" in by_id["missing"]["error"]["message"]
    assert all(body["record_id"] for body in by_id.values())
    failed, _ = store.query(CaptionFilter(status="failed"))
    assert {f["source_ref"] for f in failed} == {str(secret), str(inbox / "gone.jpg")}
    assert all(f["source"] == "queue" and f["error"] for f in failed)
    assert not store.query(CaptionFilter(status="succeeded"))[0]  # the secret was never read


def test_dead_lettered_copies_keep_their_message_properties(
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    results: Results,
    broker: str,
    topology: Topology,
) -> None:
    start_consumer(sqlite_store)
    with Connection(broker) as conn:
        conn.Producer().publish(
            {"id": "x"},
            exchange="",
            routing_key=topology.queue_name,
            serializer="json",
            message_id="m-42",
            correlation_id="c-42",
            reply_to=f"{topology.queue_name}.nowhere",
            headers={"x-trace": "t1"},
        )
    results.wait(1, timeout=60)
    dead: list[Any] = []

    def collected() -> bool:
        dead.extend(_dead_letters(broker, topology))
        return bool(dead)

    wait_until(collected, 30, "the dead-lettered copy")
    message = dead[0]
    assert message.properties["message_id"] == "m-42"
    assert message.properties["correlation_id"] == "c-42"
    assert message.properties["reply_to"] == f"{topology.queue_name}.nowhere"
    assert message.headers["x-trace"] == "t1" and "Exactly one of" in message.headers[REASON_HEADER]


def test_a_queue_declared_with_other_arguments_stops_the_consumer_with_one_line(
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    broker: str,
    topology: Topology,
) -> None:
    with Connection(broker) as conn:
        conn.channel().queue_declare(topology.queue_name, durable=True, auto_delete=False)  # no dead letters
    consumer = start_consumer(sqlite_store)
    wait_until(lambda: consumer.health()["state"] == "failed", 30, "the consumer to give up")
    error = consumer.health()["last_error"]
    assert "exists with other arguments" in error and "QUEUE_NAME" in error
    reconnects = consumer.health()["reconnects"]
    # It stays stopped: the consuming loop has ended, so no retry loop is left to reconnect.
    assert consumer._stopped.wait(30), "the consumer's loop is still running after it failed"
    assert consumer.health()["reconnects"] == reconnects and consumer.health()["state"] == "failed"


def _store_behind_a_proxy(pg_url: str, retry: Backoff) -> tuple[TcpProxy, Any, CaptionRepository]:
    """A Postgres store reached through a started TCP proxy the test can cut (an outage), migrated."""
    real = make_url(pg_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    proxy.start()
    engine = make_engine(real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    upgrade(engine)
    return proxy, engine, CaptionRepository(engine, retry)


def test_a_store_outage_delays_but_loses_nothing(
    start_consumer: Callable[..., QueueConsumer],
    pg_url: str,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
) -> None:
    proxy, engine, store = _store_behind_a_proxy(pg_url, Backoff(0.1, 3.0, 2))
    consumer = start_consumer(store)
    proxy.stop()  # Postgres connections refused from here on
    for i in range(10):
        publisher.publish({"id": f"o{i}", "image_b64": base64.b64encode(image_bytes(800 + i)).decode()})
    wait_until(lambda: consumer.counts["retried"] >= 5, 60, "retries during the outage")
    assert results.items == []  # nothing announced, nothing acked
    proxy.start()
    items = results.wait(10, timeout=120)
    assert len(items) == 10 and {k for k, _ in items} == {"caption.succeeded"}
    assert _count(store) == 10
    wait_until(lambda: _queue_depth(broker, topology.queue_name) == 0, 30, "an empty queue")
    assert _queue_depth(broker, topology.dead_name) == 0  # a passing failure is never dead-lettered
    proxy.stop()
    engine.dispose()


def test_messages_held_past_the_brokers_consumer_timeout_come_back_and_the_consumer_goes_on(
    broker_control: BrokerControl,
    start_consumer: Callable[..., QueueConsumer],
    pg_url: str,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
) -> None:
    """A store outage longer than RabbitMQ's consumer_timeout (30 min by default; 2 s here, checked
    every second): the broker closes the channel with PRECONDITION_FAILED, which the consumer took
    for a queue declared with other arguments, and it stopped consuming for good."""
    broker_control.set("consumer_timeout", 2000)
    broker_control.set("channel_tick_interval", 500)
    proxy, engine, store = _store_behind_a_proxy(pg_url, Backoff(0.1, 0.5, 2))
    consumer = start_consumer(store)
    proxy.stop()  # Postgres connections refused from here on
    try:
        for i in range(4):
            publisher.publish({"id": f"t{i}", "image_b64": base64.b64encode(image_bytes(850 + i)).decode()})
        wait_until(lambda: consumer.health()["reconnects"] >= 1, 60, "the broker to take the messages back")
        assert consumer.health()["state"] != "failed", consumer.health()["last_error"]
        proxy.start()
        items = results.wait(4, timeout=120)
        assert sorted(body["request"]["id"] for _key, body in items) == ["t0", "t1", "t2", "t3"]
        assert _count(store) == 4
        wait_until(lambda: _queue_depth(broker, topology.queue_name) == 0, 30, "an empty queue")
        assert consumer.health()["state"] == "connected"
    finally:
        proxy.stop()
        engine.dispose()


# -- real processes ---------------------------------------------------------------------------


def _consume_process(
    tmp_path: Path, data_dir: Path, broker: str, topology: Topology, db_url: str, name: str
) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "DATABASE"))},
        "MODEL": "tiny-random",
        "DTYPE": "float32",
        "NUM_BEAMS": "1",
        "MAX_NEW_TOKENS": "4",
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": db_url,
        "BROKER_URL": broker,
        "QUEUE_NAME": topology.queue_name,
        "RESULTS_EXCHANGE": topology.results_exchange_name,
        "PREFETCH": "16",
        "AUTO_UPDATE": "false",
    }
    log = (tmp_path / f"{name}.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "consume"],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _publish_many(publisher: QueuePublisher, n: int, seed: int) -> None:
    for i in range(n):
        publisher.publish({"id": f"p{i}", "image_b64": base64.b64encode(image_bytes(seed + i, size=(40, 40))).decode()})


def test_a_consumer_killed_mid_stream_loses_nothing_and_duplicates_nothing(
    broker: str, topology: Topology, publisher: QueuePublisher, pg_url: str, data_dir: Path, tmp_path: Path
) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    store = CaptionRepository(engine)
    _publish_many(publisher, 200, seed=10_000)
    first = _consume_process(tmp_path, data_dir, broker, topology, pg_url, "first")
    try:
        wait_until(lambda: _count(store) >= 40, 120, "some progress before the kill")
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        killed_at = _count(store)
        assert killed_at < 200
        second = _consume_process(tmp_path, data_dir, broker, topology, pg_url, "second")
        try:
            wait_until(lambda: _count(store) == 200, 180, "all 200 stored")
            wait_until(lambda: _queue_depth(broker, topology.queue_name) == 0, 60, "an empty queue")
        finally:
            second.send_signal(signal.SIGTERM)
            assert second.wait(60) == 0
    finally:
        if first.poll() is None:
            first.kill()
    assert _count(store) == 200  # the unique key: no caption twice
    assert _queue_depth(broker, topology.dead_name) == 0
    engine.dispose()


def test_two_consumers_share_one_queue_and_caption_each_request_once(
    broker: str,
    topology: Topology,
    publisher: QueuePublisher,
    results: Results,
    pg_url: str,
    data_dir: Path,
    tmp_path: Path,
) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    store = CaptionRepository(engine)
    workers = [_consume_process(tmp_path, data_dir, broker, topology, pg_url, f"w{i}") for i in range(2)]
    try:
        # Both subscribed before the burst, so both get work.
        wait_until(lambda: _queue_consumers(broker, topology.queue_name) == 2, 120, "both workers consuming")
        _publish_many(publisher, 100, seed=20_000)
        items = results.wait(100, timeout=180)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        codes = [w.wait(60) for w in workers]
    assert codes == [0, 0]
    assert len(items) == 100
    assert sum(1 for _, body in items if body["metadata"]["cached"] is False) == 100
    assert _count(store) == 100
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    assert all("connected" in log for log in logs)
    engine.dispose()


def test_the_consumer_reconnects_after_the_broker_goes_away_and_loses_nothing(
    make_pipeline: Callable[..., CaptionPipeline],
    sqlite_store: CaptionRepository,
    publisher: QueuePublisher,
    results: Results,
    broker: str,
    topology: Topology,
) -> None:
    """The consumer reaches RabbitMQ through a proxy that the test cuts, as a broker restart would."""
    proxy, url = _proxied(broker)
    consumer = QueueConsumer(
        url,
        pipeline=make_pipeline(sqlite_store, max_pending=64),
        topology=topology,
        prefetch=4,
        generation=FAST,
        max_file_size=10_000_000,
        fetcher=UrlFetcher(timeout=5, max_bytes=10_000_000, policy=AddressPolicy(allow_private=True)),
    )
    consumer.start()
    try:
        wait_until(lambda: consumer.health()["state"] == "connected", 30, "the first connection")
        for i in range(20):
            publisher.publish({"id": f"c{i}", "image_b64": base64.b64encode(image_bytes(900 + i)).decode()})
        wait_until(lambda: _count(sqlite_store) >= 3, 60, "some progress")
        proxy.stop()  # every connection cut, new ones refused
        wait_until(lambda: consumer.health()["state"] == "reconnecting", 30, "the consumer to notice")
        time.sleep(2)
        proxy.start()
        wait_until(lambda: _count(sqlite_store) == 20, 120, "all twenty stored")
        wait_until(lambda: _queue_depth(broker, topology.queue_name) == 0, 60, "an empty queue")
        assert consumer.health()["state"] == "connected"
        wanted = {f"c{i}" for i in range(20)}
        deadline = time.monotonic() + 60  # redeliveries may announce some twice: wait for every id
        while not wanted <= {body["request"]["id"] for _, body in results.items} and time.monotonic() < deadline:
            results.wait(len(results.items) + 1, timeout=1)
        assert {body["request"]["id"] for _, body in results.items} >= wanted
        assert _queue_depth(broker, topology.dead_name) == 0
    finally:
        consumer.stop(timeout=30)
        proxy.stop()


async def test_health_names_the_broker_while_the_consumer_cannot_reach_it(
    make_pipeline: Callable[..., CaptionPipeline],
    settings_factory: Callable[..., Any],
    loaded_holder: Any,
    aiohttp_client: Callable[..., Any],
    sqlite_store: CaptionRepository,
    broker: str,
    topology: Topology,
) -> None:
    from blip2_service.http_api.app import make_app
    from blip2_service.runtime import Runtime

    proxy, url = _proxied(broker)
    consumer = _cut_consumer(url, make_pipeline(sqlite_store), topology, Backoff(0.2, 1.0))
    runtime = Runtime(settings_factory(), holder=loaded_holder)
    runtime.start()
    runtime.adapters.append(consumer)
    consumer.start()
    try:
        client = await aiohttp_client(make_app(runtime.http_context()))
        wait_until(lambda: consumer.health()["state"] == "connected", 30, "the consumer to connect")
        assert (await client.get("/health")).status == 200
        proxy.stop()
        wait_until(lambda: consumer.health()["state"] != "connected", 30, "the consumer to notice")
        resp = await client.get("/health")
        body = await resp.json()
        assert resp.status == 503 and body["broker"] == "down" and "broker" in body["unavailable"]
    finally:
        runtime.stop()
        proxy.stop()


def test_with_the_broker_gone_the_consumer_waits_on_its_own_backoff_and_a_stop_ends_it_at_once(
    make_pipeline: Callable[..., CaptionPipeline],
    sqlite_store: CaptionRepository,
    broker: str,
    topology: Topology,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """kombu's own reconnect loop waited 2, 4, 6 ... 30 s inside its connect and never looked at a
    stop: a SIGTERM while RabbitMQ was down hung for the whole in-flight grace period."""
    proxy, url = _proxied(broker)
    consumer = _cut_consumer(url, make_pipeline(sqlite_store), topology, Backoff(0.1, 0.4))
    consumer.start()
    try:
        wait_until(lambda: consumer.health()["state"] == "connected", 30, "the consumer to connect")
        proxy.stop()
        with caplog.at_level("WARNING", logger="blip2_service.consumer"):
            wait_until(lambda: consumer.counts["reconnects"] >= 5, 60, "five reconnect attempts")
            waits = [float(m) for m in re.findall(r"retrying in ([0-9.]+)s", caplog.text)]
            assert waits[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]
            consumer.stop(timeout=30)
        assert consumer.health()["state"] == "stopped"
        assert "still in flight at shutdown" not in caplog.text  # it ended by itself, not by the timeout
    finally:
        consumer.stop(timeout=1)
        proxy.stop()


def test_the_gateway_reconnects_when_the_broker_returns_and_a_stop_while_it_is_gone_ends_its_thread(
    broker: str, topology: Topology
) -> None:
    from blip2_service.gateway import QueueGateway

    proxy, url = _proxied(broker)
    gateway = QueueGateway(url, topology, timeout=5, backoff=Backoff(0.1, 0.4))
    gateway.start()
    try:
        wait_until(lambda: gateway.health()["state"] == "connected", 30, "the gateway to connect")
        proxy.stop()
        wait_until(lambda: gateway.health()["state"] == "reconnecting", 30, "the gateway to notice")
        request = CaptionRequest(Source.HTTP, "upload", image_bytes(5), FAST)
        with pytest.raises(ModelNotReady, match="cannot reach the broker"):  # not GATEWAY_TIMEOUT later
            gateway.submit(request)
        proxy.start()
        wait_until(lambda: gateway.health()["state"] == "connected", 30, "the gateway to reconnect")
        proxy.stop()
        # Attempts on the gateway's backoff (0.1 s rising to 0.4 s here), each wait seeing a stop
        # (kombu's own retries inside one connect slept 2 + 4 + 6 s: four attempts took 52 s).
        seen = gateway.health()["reconnects"]
        wait_until(lambda: gateway.health()["reconnects"] >= seen + 4, 20, "four more attempts")
        gateway.stop(timeout=10)
        assert not gateway._thread.is_alive()
    finally:
        gateway.stop(timeout=1)
        proxy.stop()


class _HeldWorker:
    """A worker that takes the gateway's requests (or, `bulk`, the queue's) and answers each only
    when the test says (the protocol, not the model): the test decides when, and what, a request
    is answered."""

    def __init__(self, url: str, topology: Topology, *, bulk: bool = False) -> None:
        self.connection = Connection(url)
        channel = self.connection.channel()
        topology.declare(channel)
        self.held: list[Any] = []
        queue = topology.request_queue if bulk else topology.interactive_queue
        Consumer(channel, queues=[queue], callbacks=[lambda _b, m: self.held.append(m)]).consume()

    def take(self, n: int, timeout: float = 30) -> list[Any]:
        """Wait until `n` requests are held."""
        deadline = time.monotonic() + timeout
        while len(self.held) < n and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.connection.drain_events(timeout=0.2)
        assert len(self.held) == n, f"{len(self.held)} requests reached the worker, expected {n}"
        return self.held

    def answer(self, text: str = "held", body: Any = None, **publish: Any) -> None:
        """Reply to every held request, as a worker that captioned it would (or with `body`,
        published with `publish`'s options), and ack it."""
        from kombu import Producer

        producer = Producer(self.connection.channel())
        if body is None:
            body = {"status": "success", "predictions": [{"text": text, "emoji_mappings": []}], "metadata": {}}
        for message in self.held:
            props = message.properties
            producer.publish(body, routing_key=props["reply_to"], correlation_id=props["correlation_id"], **publish)
            message.ack()
        self.held.clear()

    def close(self) -> None:
        self.connection.release()


@contextlib.contextmanager
def _gateway_with_held_worker(
    url: str, broker: str, topology: Topology, *, timeout: float
) -> Iterator[tuple[Any, _HeldWorker]]:
    """A started gateway on `url` (quick reconnects) and a `_HeldWorker` on `broker`, yielded once
    the gateway counts the worker; both stopped after (the worker's connection may be dead by then)."""
    from blip2_service.gateway import QueueGateway

    gateway = QueueGateway(url, topology, timeout=timeout, backoff=Backoff(0.1, 0.4))
    worker = _HeldWorker(broker, topology)
    gateway.start()
    try:
        wait_until(lambda: gateway.health()["workers"] == 1, 30, "the gateway to see the worker")
        yield gateway, worker
    finally:
        gateway.stop(timeout=10)
        with contextlib.suppress(Exception):
            worker.close()


def test_a_reply_sent_while_the_gateways_connection_is_down_reaches_its_request(
    broker: str, topology: Topology
) -> None:
    """A worker that finishes while the gateway is reconnecting (a network blip, a broker node
    restarting behind a load balancer) replies into the gateway's reply queue. That queue was
    exclusive, so the broker deleted it with the connection and dropped the reply: the HTTP
    client waited out GATEWAY_TIMEOUT for a 503, although its image had been captioned."""
    proxy, url = _proxied(broker)
    try:
        with _gateway_with_held_worker(url, broker, topology, timeout=60) as (gateway, worker):
            answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(31), FAST))
            reply_to = worker.take(1)[0].properties["reply_to"]
            proxy.stop()  # the gateway's connection cut
            wait_until(lambda: gateway.health()["state"] == "reconnecting", 30, "the gateway to notice")
            wait_until(lambda: _queue_consumers(broker, reply_to) == 0, 30, "the broker to see the gateway gone")
            worker.answer("a reply")
            proxy.start()
            result = answer.result(timeout=20)  # well inside GATEWAY_TIMEOUT
            assert result.status == "succeeded" and result.predictions[0].text == "a reply"
    finally:
        proxy.stop()


def test_a_reply_the_gateway_cannot_read_is_a_502_at_once_and_the_next_one_is_answered(
    broker: str, topology: Topology
) -> None:
    """A worker of another version (a rolling upgrade) or not ours answers with a body of another
    shape. The gateway took the request off its list and dropped the reply (not an object), or
    failed reading it in a callback that swallowed the error: nothing answered the client again,
    which waited until it gave up (GATEWAY_TIMEOUT no longer applied). A reply that was not JSON
    at all was worse: kombu raised it out of the connection's loop, the gateway reconnected, was
    handed the same reply again, and answered no one from then on."""
    from blip2_service.gateway import WorkerReplyUnreadable

    unreadable: list[tuple[Any, dict[str, str]]] = [
        (["a", "list"], {}),
        ("a string", {}),  # kombu sends a str as text/plain: a content type the gateway refuses
        (b'{"status": "succ', {"content_type": "application/json", "content_encoding": "utf-8"}),
        ({"status": "success", "predictions": [{"txt": "no text"}]}, {}),
        ({"status": "failed", "error_status": "not a number"}, {}),
    ]
    with _gateway_with_held_worker(broker, broker, topology, timeout=60) as (gateway, worker):
        for n, (body, publish) in enumerate(unreadable):
            answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(40 + n), FAST))
            worker.take(1)
            worker.answer(body=body, **publish)
            with pytest.raises(WorkerReplyUnreadable, match="could not be read") as refused:
                answer.result(timeout=20)  # well inside GATEWAY_TIMEOUT
            assert refused.value.status == 502
        answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(49), FAST))
        worker.take(1)
        worker.answer("still answering")
        assert answer.result(timeout=20).predictions[0].text == "still answering"
        assert gateway.pending == 0
        sample = gateway.metrics.registry.get_sample_value
        assert sample("blip2_gateway_requests_total", {"outcome": "unreadable"}) == len(unreadable)
        assert sample("blip2_gateway_requests_total", {"outcome": "answered"}) == 1
        assert sample("blip2_gateway_seconds_count") == 1


def test_a_worker_drops_a_gateway_request_whose_client_already_had_its_503(
    broker: str,
    topology: Topology,
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Requests wait in the queue behind a stalled worker; each client has its 503 after
    GATEWAY_TIMEOUT. When a worker comes back it captioned that backlog first, spending the GPU on
    answers no one waited for while the requests behind them timed out in turn. The gateway now
    stamps a deadline, and a worker that takes a request past it acks it without captioning."""
    with _gateway_with_held_worker(broker, broker, topology, timeout=1.0) as (gateway, stalled):
        late = [gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(50 + n), FAST)) for n in range(3)]
        stalled.take(3)
        for answer in late:
            with pytest.raises(ModelNotReady, match="GATEWAY_TIMEOUT"):
                answer.result(timeout=20)
        # what says "add workers": requests that waited out GATEWAY_TIMEOUT, counted by the gateway
        assert gateway.metrics.registry.get_sample_value("blip2_gateway_requests_total", {"outcome": "timeout"}) == 3
        stalled.close()  # the worker died: its requests go back to the queue, past their deadline
        worker = start_consumer(sqlite_store)
        handled = ("expired", "succeeded", "failed")
        wait_until(lambda: sum(worker.counts.get(k, 0) for k in handled) == 3, 60, "the worker to take all three")
        assert worker.counts.get("expired") == 3, worker.counts
        # Said, rate-limited, with the one cause that would drop every request: the clocks.
        said = [r.getMessage() for r in caplog.records if "past their deadline" in r.getMessage()]
        assert said and "check that this host's clock agrees with the gateway's" in said[0]
        assert _queue_depth(broker, topology.interactive_name) == 0
        assert _queue_depth(broker, topology.dead_name) == 0  # dropped, not failed
        assert sqlite_store.count() == 0 and worker.counts["succeeded"] == 0
        gateway.timeout = 60  # a client that can wait: captioned as before
        wait_until(lambda: gateway.health()["workers"] == 1, 30, "the gateway to count the new worker")
        fresh = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(59), FAST))
        assert fresh.result(timeout=60).status == "succeeded"
        assert sqlite_store.count() == 1


def test_a_request_whose_publish_met_a_dropped_connection_is_sent_on_the_next_one(
    broker: str, topology: Topology
) -> None:
    """The AMQP thread took a request off its outbox, the publish failed with the connection, and
    the request was never sent: its client waited out GATEWAY_TIMEOUT for a 503."""
    from kombu import Producer

    from blip2_service.gateway import QueueGateway

    gateway = QueueGateway(broker, topology, timeout=60, backoff=Backoff(0.1, 0.4))
    answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(32), FAST))
    dropped = Connection(broker)
    producer = Producer(dropped.channel())
    dropped.collect()  # the connection gone under the producer, as a broker restart leaves it
    with pytest.raises(Exception, match="connection closed"):
        gateway._send_pending(producer)  # what the AMQP thread does, on the connection that failed
    worker = _HeldWorker(broker, topology)
    gateway.start()  # the next connection
    try:
        worker.take(1)
        worker.answer("sent")
        assert answer.result(timeout=20).predictions[0].text == "sent"
    finally:
        gateway.stop(timeout=10)
        worker.close()


def test_a_request_in_flight_through_the_gateway_is_answered_after_a_broker_restart(
    broker_control: BrokerControl,
    broker: str,
    topology: Topology,
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
) -> None:
    """The broker restarts while a worker holds a gateway's request. The request's queue is
    durable, so the request comes back for a worker; the gateway's reply queue was transient, so
    the restart deleted it and the worker's reply went nowhere: the client waited out
    GATEWAY_TIMEOUT for a 503 although its image was captioned and stored. Here the reply is sent
    while the gateway is still away (its way to the broker cut), so only a reply queue that
    outlived the restart can hold it."""
    proxy, url = _proxied(broker)
    try:
        with _gateway_with_held_worker(url, broker, topology, timeout=120) as (gateway, held):
            answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(33), FAST))
            reply_to = held.take(1)[0].properties["reply_to"]
            proxy.stop()
            wait_until(lambda: gateway.health()["state"] == "reconnecting", 30, "the gateway to notice")
            broker_control.restart()  # the held request goes back to its queue, unanswered
            worker = start_consumer(sqlite_store)  # a real worker takes it: the model, the store, the reply
            wait_until(lambda: worker.counts["succeeded"] == 1, 60, "the worker to caption the request")
            assert _queue_depth(broker, reply_to) == 1  # the reply waits for its gateway
            proxy.start()
            result = answer.result(timeout=30)  # well inside GATEWAY_TIMEOUT
            assert result.status == "succeeded" and result.predictions[0].text
            assert sqlite_store.get(result.record_id or 0) is not None
    finally:
        proxy.stop()


def test_after_a_broker_restart_the_gateway_takes_requests_before_the_workers_are_back(
    broker_control: BrokerControl, broker: str, topology: Topology
) -> None:
    """Once the broker is back the gateway reconnects and counts the consumers before the workers
    have reconnected (each on its own backoff): every request in that second or two was refused
    at once, "No worker is consuming ...; start `blip2-service consume`", with Retry-After 10,
    though the workers were a moment away. Now a request then waits for them in the queue; a
    count of no workers past the grace is still a 503 at once."""
    from blip2_service.gateway import WORKER_RECONNECT_GRACE, QueueGateway

    gateway = QueueGateway(broker, topology, timeout=60, backoff=Backoff(0.1, 0.4))
    gateway.start()
    worker: _HeldWorker | None = None
    try:
        wait_until(lambda: gateway._ready.is_set(), 30, "the gateway to count the workers")
        broker_control.restart()
        wait_until(lambda: gateway.reconnects >= 1 and gateway.state == "connected", 30, "the gateway to reconnect")
        assert gateway.workers == 0
        answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(60), FAST))
        worker = _HeldWorker(broker, topology)  # the worker, reconnected
        worker.take(1)
        worker.answer("after the restart")
        assert answer.result(timeout=20).predictions[0].text == "after the restart"
        worker.close()
        worker = None

        def refused() -> bool:
            try:
                gateway.ensure_ready()
            except ModelNotReady as exc:
                return "No worker is consuming" in exc.message
            return False

        wait_until(refused, WORKER_RECONNECT_GRACE + 10, "no worker to be a 503 again")
        assert (
            gateway.metrics.registry.get_sample_value("blip2_gateway_requests_total", {"outcome": "refused_no_worker"})
            or 0
        ) >= 1
    finally:
        gateway.stop(timeout=10)
        if worker is not None:
            worker.close()


def test_publish_wait_prints_every_result_through_a_broker_restart(
    broker_control: BrokerControl,
    broker: str,
    topology: Topology,
    settings_factory: Callable[..., Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`publish --wait` read its replies from an exclusive queue: a broker restart while it waited
    deleted the queue (and the replies in it), and the lost connection raised out of the wait: a
    traceback, and not one result printed, not even those already in."""
    from blip2_service.publisher import publish_paths

    files = []
    for n in range(2):
        files.append(tmp_path / f"{n}.jpg")
        files[-1].write_bytes(image_bytes(70 + n))
    settings = settings_factory(
        broker_url=broker, queue_name=topology.queue_name, results_exchange=topology.results_exchange_name
    )
    outcome: list[Any] = []

    def publish() -> None:
        try:
            outcome.append(publish_paths(settings, files, embed=True, wait=True, prompt=None, timeout=60))
        except BaseException as exc:
            outcome.append(exc)

    worker = _HeldWorker(broker, topology, bulk=True)
    thread = threading.Thread(target=publish)
    thread.start()
    try:
        worker.take(2)  # both published, and held by a worker when the broker goes down
        broker_control.restart()
        worker = _HeldWorker(broker, topology, bulk=True)  # the worker, reconnected: both again
        worker.take(2)
        worker.answer("through the restart")
        thread.join(60)
        assert outcome == [0]
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert sorted(line["path"] for line in lines) == sorted(str(f) for f in files)
        assert all(line["predictions"][0]["text"] == "through the restart" for line in lines)
    finally:
        thread.join(60)
        with contextlib.suppress(Exception):
            worker.close()


def test_publish_wait_without_a_broker_to_wait_on_is_one_line() -> None:
    """The broker went away between the start-up check and the reply queue's declaration."""
    from blip2_service.amqp_topology import BrokerUnavailable
    from blip2_service.publisher import ReplyCollector

    replies = ReplyCollector("amqp://guest:guest@127.0.0.1:1//", timeout=5)
    with pytest.raises(BrokerUnavailable, match=r"cannot reach the broker at .* to wait for results"):
        replies.start()
    replies.close()


class BrokerControl:
    """RabbitMQ itself, through `rabbitmqctl` (this needs the broker on this machine): its own
    settings (the `rabbit` application's environment), changed at run time for one test and put
    back after it (channels opened after a change see it), and a restart."""

    def __init__(self, ctl: str) -> None:
        self.ctl = ctl
        self.saved: dict[str, str] = {}
        self.stopped = False

    def _ctl(self, *args: str) -> str:
        done = subprocess.run([self.ctl, *args], capture_output=True, text=True, timeout=60, check=True)
        return done.stdout.strip()

    def _eval(self, expression: str) -> str:
        return self._ctl("eval", expression)

    def restart(self) -> None:
        """Stop and start the broker's application (the Erlang node stays up): every connection
        and every transient queue is gone, durable queues keep their persistent messages, as
        after a restart of the server. Returns once it accepts connections again."""
        self.stopped = True
        self._ctl("stop_app")
        self.start()

    def start(self) -> None:
        self._ctl("start_app")
        self._ctl("await_startup")
        self.stopped = False

    def set(self, name: str, value: int) -> None:
        if name not in self.saved:
            self.saved[name] = self._eval(f"application:get_env(rabbit, {name}).")
        self._eval(f"application:set_env(rabbit, {name}, {value}).")

    def restore(self) -> None:
        for name, before in self.saved.items():
            value = re.fullmatch(r"\{ok,(\d+)\}", before)
            if value:
                self._eval(f"application:set_env(rabbit, {name}, {value.group(1)}).")
            else:
                self._eval(f"application:unset_env(rabbit, {name}).")


@pytest.fixture
def broker_control(broker: str) -> Iterator[BrokerControl]:
    import shutil

    ctl = shutil.which("rabbitmqctl")
    if ctl is None:
        service_missing("rabbitmqctl", "the test changes or restarts the broker through it")
    assert ctl is not None
    control = BrokerControl(ctl)
    try:
        yield control
    finally:
        if control.stopped:  # a restart that failed half-way: the tests after this one need it
            control.start()
        control.restore()


def test_an_image_over_the_brokers_message_size_is_a_413_at_once_and_everyone_else_goes_on(
    broker_control: BrokerControl,
    broker: str,
    topology: Topology,
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    tmp_path: Path,
) -> None:
    """RabbitMQ closes the publishing channel on a message over its max_message_size. The gateway
    held such an upload for GATEWAY_TIMEOUT, then blamed busy workers (a 503 the client retries
    for ever), and reconnected, losing the replies everyone else was waiting for; `publish --embed`
    retried it, then blamed the broker's address."""
    from blip2_service.domain import TooLarge
    from blip2_service.gateway import QueueGateway

    # 1 MiB stands in for a RabbitMQ 4.x's default of 16 MiB (and a 2 MiB image for a 20 MiB one).
    broker_control.set("max_message_size", 1 << 20)
    big = image_bytes(1, size=(700, 700), fmt="PNG")
    assert len(big) > 1 << 20
    start_consumer(sqlite_store)
    gateway = QueueGateway(broker, topology, timeout=60)
    gateway.start()
    publisher = QueuePublisher(broker, topology, backoff=Backoff(0.1, 0.2, 5))
    try:
        wait_until(lambda: gateway.health()["workers"] == 1, 30, "the gateway to see the worker")
        small = [
            gateway.submit(CaptionRequest(Source.HTTP, f"upload-{i}", image_bytes(i + 10), FAST)) for i in range(3)
        ]
        refused = gateway.submit(CaptionRequest(Source.HTTP, "big-upload", big, FAST))
        with pytest.raises(TooLarge, match=r"too large for the queue.*max_message_size") as caught:
            refused.result(timeout=20)  # not GATEWAY_TIMEOUT (60 s) later
        assert caught.value.status == 413
        assert all(f.result(timeout=60).status == "succeeded" for f in small)
        after = gateway.submit(CaptionRequest(Source.HTTP, "after", image_bytes(20), FAST))
        assert after.result(timeout=60).status == "succeeded"
        assert gateway.health()["reconnects"] == 0 and gateway.health()["state"] == "connected"

        with pytest.raises(TooLarge, match="too large for the queue"):
            publisher.publish({"id": "big", "image_b64": base64.b64encode(big).decode()})
        publisher.publish({"id": "small", "path": "/x/small.jpg"})  # the same publisher goes on

        (tmp_path / "a-big.png").write_bytes(big)
        (tmp_path / "b-small.jpg").write_bytes(image_bytes(21))
        env = {**os.environ, "BROKER_URL": broker, "QUEUE_NAME": topology.queue_name}
        env["RESULTS_EXCHANGE"] = topology.results_exchange_name
        command = [sys.executable, "-m", "blip2_service.cli", "publish", "--embed", str(tmp_path)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        (line,) = [json.loads(line) for line in done.stdout.splitlines()]  # the refused file, the other sent
        assert line["path"].endswith("a-big.png") and line["status"] == "error"
        assert "max_message_size" in line["error"]["message"] and "Traceback" not in done.stderr
    finally:
        gateway.stop(timeout=10)
        publisher.close()


async def test_the_gateway_counts_the_requests_waiting_on_workers_and_refuses_past_max_pending(
    broker: str, topology: Topology, settings_factory: Callable[..., Any], aiohttp_client: Any
) -> None:
    """In gateway mode nothing goes through the local pipeline: /health's `pending` and the
    blip2_pending gauge said 0 however many requests waited on the workers, and MAX_PENDING held
    nothing back: a burst put every request on the queue, and the workers captioned requests
    whose clients had long had their 503 while each new one waited behind them."""
    import asyncio

    from blip2_service.runtime import Runtime

    runtime = Runtime(
        settings_factory(
            inference="queue",
            broker_url=broker,
            queue_name=topology.queue_name,
            results_exchange=topology.results_exchange_name,
            gateway_timeout=60,
            max_pending=3,
            request_timeout=30,
        )
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, runtime.start)
    client = await aiohttp_client(runtime.make_app())
    worker = _HeldWorker(broker, topology)

    async def pending() -> tuple[int, str]:
        health = await (await client.get("/health")).json()
        metrics = await (await client.get("/metrics")).text()
        (gauge,) = [line for line in metrics.splitlines() if line.startswith("blip2_pending ")]
        return health["pending"], gauge

    try:
        deadline = time.monotonic() + 30
        while (await (await client.get("/health")).json()).get("workers") != 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        image = {"headers": {"Content-Type": "image/jpeg"}}
        posts = [asyncio.create_task(client.post("/v3/analyze", data=image_bytes(900 + i), **image)) for i in range(3)]
        await loop.run_in_executor(None, worker.take, 3)
        assert await pending() == (3, "blip2_pending 3.0")
        refused = await client.post("/v3/analyze", data=image_bytes(903), **image)  # a fourth: over MAX_PENDING
        assert refused.status == 503 and refused.headers["Retry-After"] == "1"
        assert "MAX_PENDING" in (await refused.json())["error"]["message"]
        # ... refused before its upload is read: an upload that has not arrived yet is not waited for
        reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
        writer.write(
            b"POST /v3/analyze HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\nContent-Length: 9000000\r\n\r\n"
        )
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)  # REQUEST_TIMEOUT is 30 s here
        assert status_line.split()[1] == b"503", status_line
        writer.close()
        await loop.run_in_executor(None, worker.answer)
        answers = await asyncio.gather(*posts)
        assert [a.status for a in answers] == [200, 200, 200]
        assert await pending() == (0, "blip2_pending 0.0")
        again = asyncio.create_task(client.post("/v3/analyze", data=image_bytes(904), **image))
        await loop.run_in_executor(None, worker.take, 1)
        await loop.run_in_executor(None, worker.answer)
        assert (await again).status == 200
        # Each refusal counted once (the door's check and submit's both ask ensure_ready)
        metrics = await (await client.get("/metrics")).text()
        assert 'blip2_gateway_requests_total{outcome="refused_overloaded"} 2.0' in metrics
        assert 'blip2_gateway_requests_total{outcome="answered"} 4.0' in metrics
    finally:
        worker.close()
        await loop.run_in_executor(None, runtime.stop)


def test_a_gateways_request_is_not_queued_behind_a_folder_imports_backlog(
    broker: str,
    topology: Topology,
    start_consumer: Callable[..., QueueConsumer],
    sqlite_store: CaptionRepository,
    publisher: QueuePublisher,
) -> None:
    """The layout the README shows: a publishing watcher and the gateway feed the same workers.
    RabbitMQ hands out a queue's messages in order, so an HTTP request published behind an
    import's backlog waited for all of it (a 503 once the backlog outlasted GATEWAY_TIMEOUT)."""
    from blip2_service.gateway import QueueGateway

    backlog = 600
    for i in range(backlog):
        publisher.publish({"id": f"b{i}", "image_b64": base64.b64encode(image_bytes(5000 + i)).decode()})
    gateway = QueueGateway(broker, topology, timeout=300)
    gateway.start()
    try:
        start_consumer(sqlite_store)
        wait_until(lambda: gateway.health()["workers"] == 1, 30, "the gateway to see the worker")
        answer = gateway.submit(CaptionRequest(Source.HTTP, "upload", image_bytes(77), FAST))
        assert answer.result(300).status == "succeeded"
        left = _queue_depth(broker, topology.queue_name)
        assert left > 0, "the request was answered only once the whole backlog was captioned"
    finally:
        gateway.stop(timeout=10)


def test_a_publish_that_meets_a_dead_broker_raises_or_waits_it_out_and_the_publisher_recovers(
    broker: str, topology: Topology, caplog: pytest.LogCaptureFixture
) -> None:
    """The watcher's publisher tries once (it retries the file itself); the `publish` command's
    rides out a broker restart. Either way a failed try must not leave a dead channel behind."""
    import threading

    proxy, url = _proxied(broker)
    once = QueuePublisher(url, topology, backoff=Backoff(attempts=1))
    patient = QueuePublisher(url, topology, backoff=Backoff(0.1, 0.2, 1000))
    try:
        once.publish({"id": "before", "path": "/x/before.jpg"})
        proxy.stop()
        with pytest.raises(Exception):  # noqa: B017 - whichever error the transport reports
            once.publish({"id": "lost", "path": "/x/lost.jpg"})
        errors: list[BaseException] = []

        def publish() -> None:
            try:
                patient.publish({"id": "waited", "path": "/x/waited.jpg"})
            except BaseException as exc:
                errors.append(exc)

        with caplog.at_level("WARNING", logger="blip2_service.publisher"):
            waiting = threading.Thread(target=publish)
            waiting.start()
            wait_until(lambda: caplog.text.count("retrying in") >= 3, 30, "three failed tries")
            proxy.start()
            waiting.join(30)
        assert not waiting.is_alive() and not errors
        once.publish({"id": "after", "path": "/x/after.jpg"})  # a fresh connection, not the dead one
        with Connection(broker) as conn, conn.SimpleQueue(topology.request_queue) as requests:
            ids = []
            with contextlib.suppress(queue.Empty):
                while len(ids) < 4:  # one more than expected: a duplicate would show
                    message = requests.get(timeout=2)
                    ids.append(message.payload["id"])
                    message.ack()
        assert sorted(ids) == ["after", "before", "waited"]
    finally:
        once.close()
        patient.close()
        proxy.stop()


def test_files_watched_in_publish_mode_while_the_broker_is_down_are_published_once_it_is_back(
    broker: str, topology: Topology, tmp_path: Path
) -> None:
    """WATCH_MODE=publish: a file that arrives during an outage is accepted (settled, seen) and must
    reach the queue when RabbitMQ returns, once, without holding up the files behind it."""
    from blip2_service.watcher import FolderWatcher

    proxy, url = _proxied(broker)
    publisher = QueuePublisher(url, topology, backoff=Backoff(attempts=1))
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    watcher = FolderWatcher(
        [inbox],
        pipeline=None,
        store=None,
        generation=FAST,
        settle_seconds=0.2,
        polling=True,
        poll_interval=0.1,
        mode="publish",
        publish=publisher.publish,
        backoff=Backoff(0.2, 0.5),
    )
    watcher.start()
    try:
        assert watcher.catch_up_done.wait(30)
        proxy.stop()
        for i in range(3):
            (inbox / f"outage-{i}.jpg").write_bytes(image_bytes(700 + i))
        wait_until(lambda: len(watcher._retry_at) == 3, 30, "all three files waiting to be retried")
        assert watcher.health()["state"] == "degraded"  # files are not getting through: /health says so
        proxy.start()
        with Connection(broker) as conn, conn.SimpleQueue(topology.request_queue) as requests:
            paths = []
            with contextlib.suppress(queue.Empty):
                while len(paths) < 4:  # one more than expected: a duplicate would show
                    message = requests.get(timeout=5)
                    paths.append(Path(message.payload["path"]).name)
                    message.ack()
        assert sorted(paths) == [f"outage-{i}.jpg" for i in range(3)]
        assert watcher.health()["state"] == "running"
    finally:
        watcher.stop()
        publisher.close()
        proxy.stop()
