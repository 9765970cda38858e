"""HTTP load: 64 concurrent clients for 30 s against a started server, batching on and off.

Starts `blip2-service serve` (MODEL=tiny-random by default) twice, once with BATCH_MAX_SIZE=16 and
once with BATCH_MAX_SIZE=1, drives each with the same clients (POST /v3/analyze, distinct images,
store=false so every request runs the model) and prints requests/s, p50/p99 and the ratio.
Finishes in about 2 minutes here:  .venv/bin/python bench/http_load.py [--clients 64] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
from PIL import Image


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _images(n: int) -> list[bytes]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (240, 320, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(buf.getvalue())
    return out


async def _wait_healthy(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not become healthy")


async def _drive(
    url: str, clients: int, seconds: float, images: list[bytes], starts: list[float] | None = None
) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    began = time.perf_counter()
    errors = 0
    stop_at = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def client(k: int) -> None:
            nonlocal errors
            i = k
            while time.monotonic() < stop_at:
                t0 = time.perf_counter()
                async with session.post(
                    url + "/v3/analyze?store=false",
                    data=images[i % len(images)],
                    headers={"Content-Type": "image/jpeg"},
                ) as resp:
                    await resp.read()
                    if resp.status == 200:
                        latencies.append(time.perf_counter() - t0)
                        if starts is not None:
                            starts.append(t0 - began)
                    else:
                        errors += 1
                i += clients

        await asyncio.gather(*(client(k) for k in range(clients)))
    return len(latencies), errors, latencies


def _serve(port: int, batch: int, model: str, workdir: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PORT": str(port),
        "MODEL": model,
        "BATCH_MAX_SIZE": str(batch),
        "MAX_PENDING": "1024",
        "DATA_DIR": str(workdir / "data"),
        "DATABASE_URL": f"sqlite:///{workdir}/b{batch}.db",
        "WATCH_DIRS": "",
        "AUTO_UPDATE": "false",
        "LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "blip2_service.cli", "serve"], env=env, cwd=workdir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--timeline", action="store_true", help="p50/p99/max per 5 s of request start time")
    parser.add_argument("--batches", default="16,1", help="BATCH_MAX_SIZEs to run, e.g. 16 (ratio needs 16 and 1)")
    args = parser.parse_args()
    images = _images(256)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for batch in [int(b) for b in args.batches.split(",")]:
            port = _free_port()
            proc = _serve(port, batch, args.model, Path(tmp))
            try:
                url = f"http://127.0.0.1:{port}"
                asyncio.run(_wait_healthy(url))
                asyncio.run(_drive(url, 8, 3, images))  # warm-up
                starts: list[float] = []
                done, errors, lat = asyncio.run(_drive(url, args.clients, args.seconds, images, starts))
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            if args.timeline:
                _print_timeline(starts, lat, args.seconds)
            lat.sort()
            rate = done / args.seconds
            results[batch] = rate
            p99 = lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else float("nan")
            print(
                f"BATCH_MAX_SIZE={batch:2d}: {rate:7.1f} req/s  p50 {1000 * statistics.median(lat):7.1f} ms  "
                f"p99 {1000 * p99:7.1f} ms  errors {errors}  ({args.clients} clients, {args.seconds:.0f}s)",
                flush=True,
            )
    if 16 in results and 1 in results:
        print(f"batching ratio (16 vs 1): {results[16] / results[1]:.2f}x")


def _print_timeline(starts: list[float], latencies: list[float], seconds: float) -> None:
    """Where a tail comes from: a slow start, a stall, or spread evenly over the run."""
    window = 5.0
    for lo in np.arange(0.0, seconds, window):
        chosen = sorted(lat for t, lat in zip(starts, latencies, strict=True) if lo <= t < lo + window)
        if chosen:
            p99 = chosen[min(len(chosen) - 1, int(0.99 * len(chosen)))]
            print(
                f"    started {lo:4.0f}-{lo + window:<4.0f}s: {len(chosen):5d} requests  "
                f"p50 {1000 * statistics.median(chosen):7.1f}  p99 {1000 * p99:7.1f}  max {1000 * chosen[-1]:7.1f} ms"
            )


if __name__ == "__main__":
    main()
