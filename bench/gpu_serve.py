"""The real server under load, next to the model in-process at the same batch: what HTTP costs.

For each decode (greedy, beam 5) it starts `blip2-service serve` (results stored in SQLite), waits
for /health (the start-up time includes loading and warming the compiled decode), then:
  single   one client, one distinct image at a time: p50 / p90
  load     --clients closed-loop clients for --seconds: images/s, p50 / p99, GPU utilisation
  stages   where an image's time went, from the server's own blip2_stage_seconds (mean ms)
  host     the server's CPU time per image (all threads), and with --gil how long each group of
           its threads held the GIL per image (py-spy --gil on the server during the load): one
           process's host side cannot go faster than 1000 / (GIL ms per image) images/s
and stops it. Then, in this process, the same model and settings through `Captioner.caption_batch`
at batch BATCH_MAX_SIZE on preprocessed images: images/s, and HTTP's share of it.

Every request carries a distinct image (a JPEG with a counter after its end marker: same decode
cost, new sha256), so nothing is answered from the store.

  GPU:  python bench/gpu_serve.py --model full-random --dtype float16 --tokens 20
  CPU check of the script itself (minutes):  .venv/bin/python bench/gpu_serve.py --model tiny-random \\
        --device cpu --clients 16 --seconds 10 --batch-max 8
Writes a JSON summary to $OUT/gpu_serve-MODEL-DECODES.json when OUT is set, after every row.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from http_load import _free_port

STAGES = ("decode", "lookup", "preprocess", "thumbnail", "wait", "infer", "emoji", "store")


def _jpegs(n: int, size: tuple[int, int] = (640, 480)) -> list[bytes]:
    """Photo-like JPEGs (smooth content; ~50 KB at 640x480, ~3 MB at 4000x3000)."""
    out = []
    for i in range(n):
        rng = np.random.default_rng(i)
        small = Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8))
        buf = io.BytesIO()
        small.resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=88)
        out.append(buf.getvalue())
    return out


class Images:
    """An endless supply of distinct images: a counter after the JPEG's end marker changes the hash only."""

    def __init__(self, base: list[bytes]) -> None:
        self.base = base
        self.count = 0

    def next(self) -> bytes:
        self.count += 1
        return self.base[self.count % len(self.base)] + b"#%d" % self.count


class GpuSampler:
    """nvidia-smi every 200 ms: utilisation and memory, kept only while `recording`."""

    def __init__(self) -> None:
        self.util: list[float] = []
        self.memory: list[float] = []
        self.recording = False
        self._proc: subprocess.Popen[str] | None = None
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "--query-gpu=utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "200",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) >= 2 and parts[0].replace(".", "").isdigit():
                self.memory.append(float(parts[1]))
                if self.recording:
                    self.util.append(float(parts[0]))

    def summary(self) -> dict[str, Any]:
        if self._proc is None:
            return {"gpu_util_mean": None, "gpu_util_p50": None, "gpu_memory_peak_mib": None}
        return {
            "gpu_util_mean": round(statistics.fmean(self.util), 1) if self.util else None,
            "gpu_util_p50": statistics.median(self.util) if self.util else None,
            "gpu_memory_peak_mib": max(self.memory) if self.memory else None,
        }

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


class GilSampler:
    """py-spy --gil on the server for the load's duration: GIL-held ms per image by thread group.

    Attaching to a running process needs ptrace rights (root, or a kernel that allows it); where
    py-spy is missing or refused, the summary says why instead of a figure.
    """

    RATE = 200

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self.out = out
        self.error: str | None = None
        self.proc: subprocess.Popen[str] | None = None
        # On PATH, beside this Python (a venv), or where gpu.sh installs the wheels (PYTHONPATH/bin).
        beside = [str(Path(sys.executable).parent)]
        beside += [str(Path(site, "bin")) for site in os.environ.get("PYTHONPATH", "").split(":") if site]
        exe = shutil.which("py-spy") or shutil.which("py-spy", path=os.pathsep.join(beside))
        if exe is None:
            self.error = "py-spy not installed"
            return
        self.proc = subprocess.Popen(
            [
                exe,
                "record",
                "--gil",
                "--nonblocking",
                "--threads",
                "-r",
                str(self.RATE),
                "-d",
                str(int(seconds)),
                "-f",
                "raw",
                "-o",
                str(out),
                "-p",
                str(pid),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def summary(self, images: int) -> dict[str, Any]:
        if self.proc is not None:
            try:
                output, _ = self.proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                output, _ = self.proc.communicate()
                output += "\npy-spy did not finish within 60 s of the load"
            if self.proc.returncode != 0 or not self.out.exists():
                self.error = (output.strip().splitlines() or ["py-spy failed"])[-1][:200]
        if self.error is not None:
            return {"gil_error": self.error}
        groups, unread = gil_samples_by_thread(self.out.read_text(errors="replace"))
        per_image = {k: round(1000 * v / self.RATE / max(images, 1), 3) for k, v in sorted(groups.items())}
        out: dict[str, Any] = {
            "gil_ms_per_image": per_image,
            "gil_ms_per_image_total": round(sum(per_image.values()), 3),
        }
        if unread:
            out["gil_unread_records"] = unread
        return out


def gil_samples_by_thread(raw: str) -> tuple[dict[str, int], int]:
    """py-spy's `--threads -f raw` output as samples per group of threads (a pool's threads
    together: `decode_0`, `decode_1` -> `decode`), and how many records could not be read.

    One record per stack, `thread (TID): NAME;frame;frame... COUNT`, but a frame's name may run
    over several lines: SQLAlchemy's compiled statements show up as frames named by their SQL
    text. Reading line by line took the SQL's second line for a record and failed on it, which
    lost the whole row of the GPU run (seen on the CPU rehearsal, 2026-12-01). Records are cut
    where a line begins with `thread (` instead."""
    groups: dict[str, int] = {}
    unread = 0
    for record in re.split(r"\n(?=thread \()", raw.strip()):
        stack, _, count = record.rpartition(" ")
        if not record.startswith("thread (") or not count.isdigit():
            unread += 1 if record.strip() else 0
            continue
        head = stack.split(";", 1)[0]
        name = head.split(": ", 1)[1] if ": " in head else head
        group = re.sub(r"_\d+$", "", name.strip()) or "?"
        groups[group] = groups.get(group, 0) + int(count)
    return groups, unread


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, float]:
    t0 = time.perf_counter()
    async with session.post(url + "/v3/analyze", data=data, headers={"Content-Type": "image/jpeg"}) as resp:
        await resp.read()
        return resp.status, time.perf_counter() - t0


async def _wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode} before it was healthy")
            try:
                async with session.get(url + "/health") as resp:
                    if resp.status == 200:
                        return
                    body = await resp.json(content_type=None)
                    if body.get("model_status") == "failed":
                        raise RuntimeError(f"the server's model failed: {body.get('error')}")
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
    raise RuntimeError(f"server not healthy after {timeout:.0f}s")


async def _single(url: str, images: Images, n: int) -> list[float]:
    out = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            status, took = await _post(session, url, images.next())
            if status != 200:
                raise RuntimeError(f"single-image request answered {status}")
            out.append(took)
    return out


async def _load(url: str, images: Images, clients: int, seconds: float) -> tuple[int, int, list[float]]:
    latencies: list[float] = []
    errors = 0
    stop_at = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:

        async def client() -> None:
            nonlocal errors
            while time.monotonic() < stop_at:
                status, took = await _post(session, url, images.next())
                if status == 200:
                    latencies.append(took)
                else:
                    errors += 1

        await asyncio.gather(*(client() for _ in range(clients)))
    return len(latencies), errors, latencies


async def _stages(url: str) -> dict[str, tuple[float, float]]:
    """blip2_stage_seconds sum and count per stage, scraped from /metrics."""
    async with aiohttp.ClientSession() as session, session.get(url + "/metrics") as resp:
        text = await resp.text()
    found: dict[str, list[float]] = {}
    for match in re.finditer(r'blip2_stage_seconds_(sum|count)\{stage="(\w+)"\} ([0-9.e+-]+)', text):
        kind, stage, value = match.groups()
        found.setdefault(stage, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    for match in re.finditer(r"blip2_batch_size_(sum|count) ([0-9.e+-]+)", text):
        kind, value = match.groups()
        found.setdefault("batch_size", [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
    return {stage: (v[0], v[1]) for stage, v in found.items()}


def _serve(args: argparse.Namespace, beams: int, port: int, workdir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PORT": str(port),
        "PRIVATE": "true",
        "MODEL": args.model,
        "DEVICE": args.device,
        "DTYPE": args.dtype,
        "NUM_BEAMS": str(beams),
        "MAX_NEW_TOKENS": str(args.tokens),
        "MIN_NEW_TOKENS": str(args.tokens),
        "BATCH_MAX_SIZE": str(args.batch_max),
        "COMPILE": args.compile,
        "MAX_PENDING": "4096",
        "DATA_DIR": str(args.data_dir),
        "DATABASE_URL": f"sqlite:///{workdir}/serve-{beams}.db",
        "WATCH_DIRS": "",
        "AUTO_UPDATE": "false",
        "LOG_LEVEL": "INFO",
    }
    log = log_path.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "serve"], env=env, cwd=workdir, stdout=log, stderr=log
    )


def run_server(args: argparse.Namespace, beams: int, images: Images, sampler: GpuSampler) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="gpu-serve-"))
    log_path = Path(os.environ.get("OUT", workdir)) / f"server-beam{beams}.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    began = time.perf_counter()
    proc = _serve(args, beams, port, workdir, log_path)
    try:
        asyncio.run(_wait_healthy(url, proc, args.start_timeout))
        startup = time.perf_counter() - began
        asyncio.run(_single(url, images, 3))  # first requests after start (allocator, caches)
        single = asyncio.run(_single(url, images, args.single))
        asyncio.run(_load(url, images, args.clients, 3))  # warm the full-batch path
        before = asyncio.run(_stages(url))
        gil = GilSampler(proc.pid, args.seconds, log_path.with_name(f"gil-beam{beams}.txt")) if args.gil else None
        cpu_before = _cpu_seconds(proc.pid)
        sampler.recording = True
        done, errors, lat = asyncio.run(_load(url, images, args.clients, args.seconds))
        sampler.recording = False
        cpu_ms = 1000 * (_cpu_seconds(proc.pid) - cpu_before) / max(done, 1)
        after = asyncio.run(_stages(url))
        host: dict[str, Any] = {"server_cpu_ms_per_image": round(cpu_ms, 2)}
        if gil is not None:
            try:  # a secondary figure: whatever goes wrong reading it must not lose the row
                host.update(gil.summary(done))
            except Exception as exc:
                host["gil_error"] = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
    stages = {}
    for stage in STAGES:
        s0, c0 = before.get(stage, (0.0, 0.0))
        s1, c1 = after.get(stage, (0.0, 0.0))
        stages[stage] = round(1000 * (s1 - s0) / (c1 - c0), 2) if c1 > c0 else None
    (b0, n0), (b1, n1) = before.get("batch_size", (0.0, 0.0)), after.get("batch_size", (0.0, 0.0))
    warm_line = next((ln for ln in log_path.read_text(errors="replace").splitlines() if "decode warmed" in ln), "")
    return {
        "beams": beams,
        "startup_s": round(startup, 1),
        "warm_log": warm_line.strip()[-80:],
        "single_p50_ms": round(1000 * statistics.median(single), 1),
        "single_p90_ms": round(1000 * _percentile(single, 0.9), 1),
        "load_images_per_s": round(done / args.seconds, 1),
        "load_p50_ms": round(1000 * statistics.median(lat), 1) if lat else None,
        "load_p99_ms": round(1000 * _percentile(lat, 0.99), 1) if lat else None,
        "load_errors": errors,
        "load_mean_batch": round((b1 - b0) / (n1 - n0), 1) if n1 > n0 else None,
        "stages_ms": stages,
        **host,
        **sampler.summary(),
    }


def run_inprocess(args: argparse.Namespace, beams: int, base: list[bytes]) -> dict[str, Any]:
    """`Captioner.caption_batch` at batch BATCH_MAX_SIZE, built and warmed as the server builds it."""
    import torch

    from blip2_service.captioner.loading import load_model
    from blip2_service.config import Settings
    from blip2_service.imaging import decode_image
    from blip2_service.runtime import prepare_captioner

    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        model=args.model,
        device=args.device,
        dtype=args.dtype,
        num_beams=beams,
        max_new_tokens=args.tokens,
        min_new_tokens=args.tokens,
        batch_max_size=args.batch_max,
        compile=args.compile,
        data_dir=args.data_dir,
    )
    loaded = load_model(settings.model, device=settings.device, dtype=settings.dtype, data_dir=settings.data_dir)
    captioner = prepare_captioner(loaded, settings=settings)
    batch = args.batch_max
    pixels = [
        captioner.preprocess(decode_image(b, max_file_size=1 << 26, max_image_pixels=1 << 28).image) for b in base
    ]
    gen = settings.generation()
    while len(pixels) < batch:  # few large base images: repeat them up to one full batch
        pixels = pixels + pixels[: batch - len(pixels)]
    chunks = [pixels[i : i + batch] for i in range(0, len(pixels) - batch + 1, batch)] or [pixels[:batch]]
    captioner.caption_batch(chunks[0], [gen] * len(chunks[0]))
    one = [captioner.caption_batch(pixels[:1], [gen]) for _ in range(1)]
    del one
    sync = torch.cuda.synchronize if loaded.device.type == "cuda" else (lambda: None)
    singles = []
    for p in pixels[: args.single]:
        sync()
        t0 = time.perf_counter()
        captioner.caption_batch([p], [gen])
        sync()
        singles.append(time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    images = 0
    while time.perf_counter() - t0 < args.seconds / 2 or images == 0:
        for chunk in chunks:
            captioner.caption_batch(chunk, [gen] * len(chunk))
            images += len(chunk)
    sync()
    took = time.perf_counter() - t0
    return {
        "beams": beams,
        "batch": batch,
        "inprocess_single_p50_ms": round(1000 * statistics.median(singles), 1),
        "inprocess_images_per_s": round(images / took, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="full-random")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--decode", default="greedy,beam", help="greedy, beam (beam 5), or both")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--single", type=int, default=30, help="sequential single-image requests")
    parser.add_argument("--batch-max", type=int, default=64)
    parser.add_argument("--compile", default="auto")
    parser.add_argument("--start-timeout", type=float, default=600)
    parser.add_argument("--no-inprocess", action="store_true")
    parser.add_argument("--gil", action="store_true", help="py-spy --gil on the server during the load")
    parser.add_argument("--image-size", default="640x480", help="the JPEGs' width x height (a phone photo: 4000x3000)")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/blip2-bench/data"))
    args = parser.parse_args()

    width, height = (int(v) for v in args.image_size.lower().split("x"))
    base = _jpegs(128 if width * height <= 1_000_000 else 16, (width, height))
    images = Images(base)
    sampler = GpuSampler()
    results: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        """Printed and written as soon as measured: a step cut short by its time limit keeps what it had."""
        print(json.dumps(row), flush=True)
        if os.environ.get("OUT"):
            name = f"gpu_serve-{args.model}-{args.decode.replace(',', '-')}.json"
            Path(os.environ["OUT"], name).write_text(json.dumps(results, indent=2))

    try:
        for name in args.decode.split(","):
            beams = 5 if name.strip() == "beam" else 1
            row = run_server(args, beams, images, sampler)
            results.append(row)
            record(row)
            if not args.no_inprocess:
                row.update(run_inprocess(args, beams, base))
                row["http_share_of_inprocess"] = round(row["load_images_per_s"] / row["inprocess_images_per_s"], 3)
                record(row)
    finally:
        sampler.close()
    for row in results:
        print(
            f"{args.model} beams={row['beams']} COMPILE={args.compile} BATCH_MAX_SIZE={args.batch_max}: "
            f"start {row['startup_s']} s | single p50 {row['single_p50_ms']} ms p90 {row['single_p90_ms']} ms | "
            f"{args.clients} clients {row['load_images_per_s']} img/s p50 {row['load_p50_ms']} ms "
            f"p99 {row['load_p99_ms']} ms, mean batch {row['load_mean_batch']} | "
            f"in-process {row.get('inprocess_images_per_s')} img/s "
            f"(HTTP {100 * row.get('http_share_of_inprocess', float('nan')):.0f} %) | "
            f"GPU util {row['gpu_util_mean']} % peak {row['gpu_memory_peak_mib']} MiB"
        )
        print("    stages (mean ms per image): " + "  ".join(f"{k} {v}" for k, v in row["stages_ms"].items()))
        gil = row.get("gil_ms_per_image")
        print(
            f"    host: server CPU {row['server_cpu_ms_per_image']} ms per image; GIL held per image: "
            + (
                "  ".join(f"{k} {v}" for k, v in gil.items()) + f"  (total {row['gil_ms_per_image_total']} ms)"
                if gil
                else row.get("gil_error", "not measured (--gil)")
            )
        )


if __name__ == "__main__":
    main()
