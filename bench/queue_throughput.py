"""Requests per second through RabbitMQ end to end (publish -> consume -> caption -> store -> result),
with the real tiny-random model and SQLite, at PREFETCH=1 and PREFETCH=32.

Needs RabbitMQ on 127.0.0.1:5672. Finishes in about 2 minutes here:
  .venv/bin/python bench/queue_throughput.py [--messages 500] [--broker amqp://guest:guest@127.0.0.1:5672//]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from kombu import Connection, Consumer, Queue
from PIL import Image

from blip2_service.amqp_topology import Topology
from blip2_service.captioner.holder import ModelHolder
from blip2_service.consumer import QueueConsumer
from blip2_service.domain import GenerationSettings
from blip2_service.emoji import EmojiMapper
from blip2_service.fetching import UrlFetcher
from blip2_service.pipeline import CaptionPipeline, PipelineLimits
from blip2_service.publisher import QueuePublisher
from blip2_service.store import CaptionRepository, make_engine, upgrade
from tiny_setup import tiny_model_and_mapper

SETTINGS = GenerationSettings(num_beams=1, max_new_tokens=8)


def payload(i: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(buf, "JPEG")
    return base64.b64encode(buf.getvalue()).decode()


def run(broker: str, prefetch: int, messages: int, holder: ModelHolder, mapper: EmojiMapper, tmp: Path) -> float:
    name = f"blip2.bench.{uuid.uuid4().hex[:8]}"
    topology = Topology(name, f"{name}.results")
    engine = make_engine(f"sqlite:///{tmp / (name + '.db')}")
    upgrade(engine)
    pipeline = CaptionPipeline(
        holder=holder,
        mapper=mapper,
        store=CaptionRepository(engine),
        limits=PipelineLimits(batch_max_size=16, max_pending=256),
    )
    pipeline.start()
    conn = Connection(broker)
    channel = conn.channel()
    topology.declare(channel)
    results = Queue(f"{name}.collect", exchange=topology.results_exchange, routing_key="caption.#", auto_delete=True)
    got = []
    consumer = Consumer(channel, queues=[results], callbacks=[lambda b, m: (got.append(b), m.ack())], accept=["json"])
    consumer.consume()
    publisher = QueuePublisher(broker, topology)
    bodies = [payload(i) for i in range(messages)]
    for i, body in enumerate(bodies):
        publisher.publish({"id": i, "image_b64": body})
    worker = QueueConsumer(
        broker,
        pipeline=pipeline,
        topology=topology,
        prefetch=prefetch,
        generation=SETTINGS,
        max_file_size=10_000_000,
        fetcher=UrlFetcher(timeout=5, max_bytes=10_000_000),
    )
    t0 = time.perf_counter()
    worker.start()
    while len(got) < messages:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=1)
    elapsed = time.perf_counter() - t0
    worker.stop()
    pipeline.stop()
    publisher.close()
    consumer.cancel()  # before deleting its queue, or the broker cancels it under us
    for queue_name in (name, topology.interactive_name, topology.dead_name, f"{name}.collect"):
        channel.queue_delete(queue_name)
    channel.exchange_delete(topology.results_exchange_name)
    channel.exchange_delete(topology.dead_name)
    conn.release()
    engine.dispose()
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--broker", default="amqp://guest:guest@127.0.0.1:5672//")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        holder, mapper = tiny_model_and_mapper(tmp)
        rates = {}
        for prefetch in (1, 32):
            rates[prefetch] = run(args.broker, prefetch, args.messages, holder, mapper, tmp)
            print(
                f"PREFETCH={prefetch:2d}: {rates[prefetch]:7.1f} requests/s end to end ({args.messages} messages, "
                "tiny-random, SQLite)",
                flush=True,
            )
        print(f"prefetch 32 vs 1: {rates[32] / rates[1]:.1f}x")


if __name__ == "__main__":
    main()
