"""What the gateway costs a request: the same images through `serve` and through a gateway + worker.

Starts, side by side on the real RabbitMQ and Postgres: (a) `blip2-service serve` with the model
in-process, and (b) a gateway (`INFERENCE=queue serve`) with one `blip2-service consume` worker
behind it. Each stores into its own Postgres schema, so both pay the same store. Prints, for each,
one client's p50/p90 (sequential distinct images: latency) and 16 clients' images/s, and the
gateway's added milliseconds. MODEL=tiny-random unless --model says otherwise; about a minute here:

  .venv/bin/python bench/gateway_latency.py [--requests 100] [--seconds 15]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
from sqlalchemy import create_engine, text

from http_load import _drive, _free_port, _images, _wait_healthy

AMQP = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")
POSTGRES = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


@contextmanager
def _schema() -> Iterator[str]:
    """A fresh Postgres schema's name (DB_SCHEMA); dropped after."""
    name = f"bench_{uuid.uuid4().hex[:8]}"
    engine = create_engine(POSTGRES)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield name
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {name} CASCADE"))
        engine.dispose()


def _start(command: str, env: dict[str, str], workdir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "blip2_service.cli", command], env=env, cwd=workdir)


async def _sequential(url: str, images: list[bytes]) -> list[float]:
    """One client, one distinct image after another: what a single request waits."""
    latencies = []
    async with aiohttp.ClientSession() as session:
        for image in images:
            began = time.perf_counter()
            async with session.post(url + "/v3/analyze", data=image, headers={"Content-Type": "image/jpeg"}) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"{url}: {resp.status}")
            latencies.append(time.perf_counter() - began)
    return latencies


def _measure(url: str, images: list[bytes], requests: int, seconds: float) -> tuple[float, float, float]:
    asyncio.run(_wait_healthy(url))
    asyncio.run(_sequential(url, images[-8:]))  # warm-up, not counted
    latencies = sorted(asyncio.run(_sequential(url, images[:requests])))
    done, errors, _ = asyncio.run(_drive(url, 16, seconds, images[requests:]))
    if errors:
        raise RuntimeError(f"{url}: {errors} errors under load")
    p90 = latencies[int(0.9 * (len(latencies) - 1))]
    return statistics.median(latencies), p90, done / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--requests", type=int, default=100, help="sequential requests for the latency figures")
    parser.add_argument("--seconds", type=float, default=15, help="seconds of 16-client load")
    args = parser.parse_args()
    images = _images(args.requests + 2048)
    queue = f"bench.gateway.{uuid.uuid4().hex[:8]}"
    base = {
        **os.environ,
        "MODEL": args.model,
        "NUM_BEAMS": "1",
        "MAX_NEW_TOKENS": "8",
        "MIN_NEW_TOKENS": "8",
        "WATCH_DIRS": "",
        "AUTO_UPDATE": "false",
        "LOG_LEVEL": "WARNING",
        "MAX_PENDING": "1024",
        "DATABASE_URL": POSTGRES,
    }
    figures = {}
    with tempfile.TemporaryDirectory() as tmp, _schema() as direct_schema, _schema() as queue_schema:
        workdir = Path(tmp)
        port = _free_port()
        direct = _start("serve", {**base, "PORT": str(port), "DB_SCHEMA": direct_schema}, workdir)
        try:
            figures["serve (model in-process)"] = _measure(
                f"http://127.0.0.1:{port}", images, args.requests, args.seconds
            )
        finally:
            direct.send_signal(signal.SIGTERM)
            direct.wait(60)
        queued = {**base, "DB_SCHEMA": queue_schema, "BROKER_URL": AMQP, "QUEUE_NAME": queue}
        queued["RESULTS_EXCHANGE"] = f"{queue}.results"
        port = _free_port()
        worker = _start("consume", queued, workdir)
        gateway = _start("serve", {**queued, "INFERENCE": "queue", "PORT": str(port)}, workdir)
        try:
            figures["gateway + 1 worker"] = _measure(f"http://127.0.0.1:{port}", images, args.requests, args.seconds)
        finally:
            for proc in (gateway, worker):
                proc.send_signal(signal.SIGTERM)
            for proc in (gateway, worker):
                proc.wait(60)
        _delete_topology(queue)
    for name, (p50, p90, rate) in figures.items():
        print(f"{name:26s} 1 client p50 {1000 * p50:6.1f} ms  p90 {1000 * p90:6.1f} ms   16 clients {rate:6.1f} img/s")
    (d50, _d90, drate), (g50, _g90, grate) = figures.values()
    print(f"the gateway adds {1000 * (g50 - d50):.1f} ms at p50; under load it delivers {grate / drate:.2f}x")


def _delete_topology(queue: str) -> None:
    from kombu import Connection

    with Connection(AMQP) as conn:
        channel = conn.channel()
        for name in (queue, f"{queue}.interactive", f"{queue}.dead"):
            channel.queue_delete(name)
        for name in (f"{queue}.results", f"{queue}.dead"):
            channel.exchange_delete(name)


if __name__ == "__main__":
    main()
