"""`blip2-service reprocess`: stored images captioned again by another model, on SQLite and Postgres,
locally and through the queue."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blip2_service.amqp_topology import Topology
from blip2_service.captioner.tiny import build_tiny_random
from blip2_service.consumer import QueueConsumer
from blip2_service.domain import GenerationSettings
from blip2_service.fetching import UrlFetcher
from blip2_service.store import CaptionFilter, CaptionRepository, make_engine, upgrade

from ..conftest import AMQP_URL, delete_topology, image_bytes, port_open, service_missing, wait_until
from .test_cli import _cli, _env


def _photos(tmp_path: Path, n: int = 30) -> list[Path]:
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = []
    for i in range(n):
        path = folder / f"p{i:02d}.jpg"
        path.write_bytes(image_bytes(2000 + i))
        paths.append(path)
    return paths


def _count(url: str, model: str) -> int:
    engine = make_engine(url)
    try:
        store = CaptionRepository(engine)
        items, cursor = store.query(CaptionFilter(model=model), limit=500)
        assert cursor is None
        return len(items)
    finally:
        engine.dispose()


def test_reprocess_with_another_model_captions_what_is_readable_and_keeps_the_old(
    tmp_path: Path, data_dir: Path, db_url: str
) -> None:
    first = str(data_dir / "models" / "tiny-random")
    build_tiny_random(data_dir / "models" / "tiny-random")
    second = str(build_tiny_random(tmp_path / "tiny-b", seed=1))  # another build: another model
    photos = _photos(tmp_path)
    env = _env(tmp_path, data_dir, DATABASE_URL=db_url, MODEL=first)
    done = _cli("caption", str(tmp_path / "photos"), env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _count(db_url, first) == 30
    gone = photos[:5]
    for path in gone:
        path.unlink()

    again = _cli("reprocess", "--model", first, env={**env, "MODEL": second}, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    lines = [json.loads(line) for line in again.stdout.splitlines()]
    assert sum(line["status"] == "succeeded" for line in lines) == 25
    skipped = [line for line in lines if line["status"] == "skipped"]
    assert len(skipped) == 5
    assert "25 captioned, 5 skipped (no readable file), 0 failed" in again.stderr
    for line in skipped:
        assert f"skipped {line['image_sha256']}: no readable file left" in again.stderr
    assert _count(db_url, second) == 25
    assert _count(db_url, first) == 30  # the old captions are kept, and listed
    assert {line["path"] for line in lines if line["status"] == "succeeded"} == {str(p) for p in photos[5:]}


@pytest.fixture
def broker() -> str:
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    return AMQP_URL


def test_reprocess_via_queue_feeds_a_real_consumer(
    tmp_path: Path,
    data_dir: Path,
    sqlite_url: str,
    broker: str,
    make_pipeline: Callable[..., Any],
) -> None:
    first = str(data_dir / "models" / "tiny-random")
    build_tiny_random(data_dir / "models" / "tiny-random")
    photos = _photos(tmp_path, n=8)
    env = _env(tmp_path, data_dir, DATABASE_URL=sqlite_url, MODEL=first)
    assert _cli("caption", str(tmp_path / "photos"), env=env, cwd=tmp_path).returncode == 0
    photos[0].unlink()
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    topology = Topology(name, f"{name}.results")
    engine = make_engine(sqlite_url)
    upgrade(engine)
    store = CaptionRepository(engine)
    consumer = QueueConsumer(
        broker,
        pipeline=make_pipeline(store),  # the session's tiny-random: stored under another model name
        topology=topology,
        prefetch=8,
        generation=GenerationSettings(num_beams=1, max_new_tokens=6),
        max_file_size=10_000_000,
        fetcher=UrlFetcher(timeout=5, max_bytes=10_000_000),
        file_roots=[(tmp_path / "photos").resolve()],
    )
    consumer.start()
    try:
        sent = _cli(
            "reprocess",
            "--via-queue",
            env={**env, "BROKER_URL": broker, "QUEUE_NAME": name, "RESULTS_EXCHANGE": f"{name}.results"},
            cwd=tmp_path,
        )
        assert sent.returncode == 0, sent.stderr
        assert "7 published" in sent.stderr and "1 skipped" in sent.stderr
        wait_until(lambda: _count(sqlite_url, "tiny-random") == 7, 60, "7 captions by the worker's model")
        time.sleep(0.5)
        assert _count(sqlite_url, "tiny-random") == 7 and _count(sqlite_url, first) == 8
    finally:
        consumer.stop(10)
        engine.dispose()
        delete_topology(broker, name)
