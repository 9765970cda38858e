"""Throughput of (a) the seed's way and (b) our pipeline, side by side in one run, on one machine.

(a) seed:     one image per `generate` call, float32, the model's default processor per request.
(b) pipeline: the real `CaptionPipeline.submit` path (decode from bytes, hash, preprocess on
              worker threads, micro-batches, dtype auto, emoji mapping), no store.

Same images, same generation settings (min_new_tokens = max_new_tokens, so random weights write
as many tokens as a real caption), greedy and beam. Prints images/s, the ratio b/a, p50/p95
latency and the share of (b)'s wall time spent outside `generate`.

Models: tiny-random (pipeline overhead), full-random (BLIP-2 OPT-2.7b's shapes) and
full-random-t5 (BLIP-2 Flan-T5-XL's shapes), random weights built in memory, measured and freed
one dtype at a time (both do not fit in 24 GiB).

Finishes in under 10 minutes on a 2-core CPU with the defaults:
  .venv/bin/python bench/throughput.py --model tiny-random
  .venv/bin/python bench/throughput.py --model full-random --decode greedy
On a GPU: --device cuda (float16 for (b)); bench/gpu.sh runs the batch sweep.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from blip2_service.captioner.holder import ModelHolder
from blip2_service.captioner.loading import LoadedModel, load_model, optimize_for_device, pick_device, pick_dtype
from blip2_service.captioner.tiny import make_full_random, make_full_random_t5
from blip2_service.domain import CaptionRequest, GenerationSettings, Source
from blip2_service.emoji import EmojiMapper, load_bundled
from blip2_service.metrics import Metrics
from blip2_service.pipeline import CaptionPipeline, PipelineLimits

WORK = Path("/tmp/blip2-bench")


@dataclass(frozen=True)
class Options:
    """Diagnostic knobs for (b) from the command line (not settings users need)."""

    prepare_workers: int = 0  # 0: the pipeline's default
    show_batches: bool = False


class RecordingMetrics(Metrics):
    """The pipeline's metrics, also keeping each batch's size and seconds for --show-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[tuple[int, float]] = []

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batches.append((size, seconds))
        super().observe_batch(size, seconds)


def jpeg(seed: int, size: int = 640) -> bytes:
    """Photo-sized JPEGs, so decode and resize cost what they cost in production."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    image = Image.fromarray(base).resize((size, size * 3 // 4), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=88)
    return out.getvalue()


@dataclass
class Run:
    name: str
    images: int
    wall: float
    latencies: list[float]
    generate_time: float

    @property
    def rate(self) -> float:
        return self.images / self.wall

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class GenerateTimer:
    """Wraps model.generate to add up the time spent inside it (from whichever thread calls it)."""

    def __init__(self, model: Any) -> None:
        self.total = 0.0
        self._inner = model.generate
        self._lock = threading.Lock()
        model.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            with self._lock:
                self.total += time.perf_counter() - started


def load(model_name: str, dtype: str, device: str, *, prepack: bool = True) -> LoadedModel:
    if model_name in ("tiny-random", "tiny-random-blip", "blip-large-random"):  # built on disk, loaded as served
        return load_model(model_name, data_dir=WORK, dtype=dtype, device=device)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    if model_name == "full-random-t5":
        model, processor = make_full_random_t5(dtype=torch_dtype, device=torch_device)
    else:
        model, processor = make_full_random(dtype=torch_dtype, work_dir=WORK / "models", device=torch_device)
    if prepack:
        optimize_for_device(model, torch_device, torch_dtype)
    processor.tokenizer.padding_side = "left"
    return LoadedModel(model_name, "blip2", model, processor, torch_device, torch_dtype)


def attention(model: Any) -> str:
    """Which attention kernels the model runs (SDPA is what a GPU should get)."""
    parts = []
    for name in ("vision_config", "qformer_config", "text_config"):
        sub = getattr(model.config, name, None)
        parts.append(f"{name.split('_')[0]} {getattr(sub, '_attn_implementation', None)}")
    return "attention: " + ", ".join(parts)


def run_seed(loaded: LoadedModel, images: list[bytes], settings: GenerationSettings) -> Run:
    """The legacy service's loop: decode, processor, generate, decode text; one image at a time."""
    timer = GenerateTimer(loaded.model)
    latencies = []
    started = time.perf_counter()
    for data in images:
        t0 = time.perf_counter()
        image = Image.open(io.BytesIO(data)).convert("RGB")
        # Flan-T5 has no BOS to start from: LAVIS feeds its encoder the tokenised (empty) prompt.
        text = "" if loaded.model.config.text_config.is_encoder_decoder else None
        inputs = loaded.processor(images=image, text=text, return_tensors="pt").to(loaded.device, loaded.dtype)
        with torch.no_grad():
            out = loaded.model.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                min_new_tokens=settings.min_new_tokens,
                num_beams=settings.num_beams,
                do_sample=False,
            )
        loaded.processor.batch_decode(out, skip_special_tokens=True)
        latencies.append(time.perf_counter() - t0)
    return Run("a: seed", len(images), time.perf_counter() - started, latencies, timer.total)


def run_pipeline(
    loaded: LoadedModel,
    images: list[bytes],
    settings: GenerationSettings,
    batch: int,
    mapper: EmojiMapper,
    options: Options,
) -> Run:
    holder = ModelHolder(lambda: loaded)
    holder.load_now()
    timer = GenerateTimer(loaded.model)
    limits = PipelineLimits(batch_max_size=batch, batch_max_wait_s=0.01, max_pending=4096)
    if options.prepare_workers:
        limits = dataclasses.replace(limits, prepare_workers=options.prepare_workers)
    metrics = RecordingMetrics()
    pipeline = CaptionPipeline(holder=holder, mapper=mapper, store=None, limits=limits, metrics=metrics)
    pipeline.start()
    started = time.perf_counter()
    submitted = [
        (
            time.perf_counter(),
            pipeline.submit(CaptionRequest(Source.CLI, f"bench/{i}", data, settings, store=False), wait=True),
        )
        for i, data in enumerate(images)
    ]
    latencies = []
    for t0, future in submitted:
        future.result()
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - started
    pipeline.stop()
    loaded.model.generate = timer._inner
    if options.show_batches:
        print("    batches (size, seconds):", ", ".join(f"({n}, {t:.2f})" for n, t in metrics.batches), flush=True)
    return Run(f"b: pipeline x{batch}", len(images), wall, latencies, timer.total)


def report(label: str, a: Run, b: Run) -> None:
    overhead = max(0.0, b.wall - b.generate_time) / b.wall
    print(
        f"{label:28s} a {a.rate:7.2f} img/s  b {b.rate:7.2f} img/s  b/a {b.rate / a.rate:5.1f}x  "
        f"p50/p95 a {a.pct(0.5):6.2f}/{a.pct(0.95):6.2f}s  b {b.pct(0.5):6.2f}/{b.pct(0.95):6.2f}s  "
        f"b outside generate {100 * overhead:4.1f}%",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["tiny-random", "full-random", "full-random-t5"], default="tiny-random")
    parser.add_argument("--decode", choices=["greedy", "beam", "both"], default="both")
    parser.add_argument("--tokens", type=int, default=20, help="caption length (min = max)")
    parser.add_argument("--batch", type=int, default=8, help="BATCH_MAX_SIZE for (b)")
    parser.add_argument(
        "--batches",
        default=None,
        help="comma-separated BATCH_MAX_SIZEs to sweep for (b) on one built model, e.g. 1,8,32,64",
    )
    parser.add_argument("--images", type=int, default=None, help="images for (b); (a) gets fewer on full-random")
    parser.add_argument("--seed-images", type=int, default=None, help="images for (a)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", help="(b)'s dtype; (a) is always float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--phase", choices=["all", "a", "b"], default="all", help=argparse.SUPPRESS)
    parser.add_argument("--json-out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-prepack", action="store_true", help="(b) without prepacked bf16 CPU weights")
    parser.add_argument("--prepare-workers", type=int, default=0, help="(b)'s decode/preprocess threads (0: default)")
    parser.add_argument("--show-batches", action="store_true", help="print each batch's size and seconds")
    parser.add_argument("--switch-interval", type=float, default=0.0, help="sys.setswitchinterval (0: Python's 5 ms)")
    args = parser.parse_args()
    options = Options(prepare_workers=args.prepare_workers, show_batches=args.show_batches)
    if args.switch_interval:
        sys.setswitchinterval(args.switch_interval)
    if args.threads:
        torch.set_num_threads(args.threads)
    full = args.model.startswith("full-random")
    n_b = args.images or (args.batch * (1 if full else 16))
    n_a = args.seed_images or (2 if full else n_b)
    images = [jpeg(i) for i in range(max(n_a, n_b))]
    table = load_bundled()
    mapper = EmojiMapper(table.table, table.stopwords)
    modes = ["greedy", "beam"] if args.decode == "both" else [args.decode]
    settings = {
        m: GenerationSettings(
            num_beams=1 if m == "greedy" else 5, max_new_tokens=args.tokens, min_new_tokens=args.tokens
        )
        for m in modes
    }
    device = pick_device(args.device)
    print(
        f"model {args.model}, device {device}, torch threads {torch.get_num_threads()}, "
        f"(b) dtype {str(pick_dtype(args.dtype, device)).removeprefix('torch.')}, {args.tokens} tokens, "
        f"(a) {n_a} images, (b) {n_b} images at batch {args.batch}",
        flush=True,
    )

    seed_runs: dict[str, Run] = {}
    pipe_runs: dict[str, Run] = {}
    if not full:
        # Small enough to hold both: alternate a and b, twice, keep the better of each.
        seed_model = load(args.model, "float32", args.device)
        ours = load(args.model, args.dtype, args.device, prepack=not args.no_prepack)
        for mode in modes:
            run_seed(seed_model, images[:2], settings[mode])
            run_pipeline(ours, images[: args.batch], settings[mode], args.batch, mapper, options)
            for _ in range(2):
                a = run_seed(seed_model, images[:n_a], settings[mode])
                b = run_pipeline(ours, images[:n_b], settings[mode], args.batch, mapper, options)
                seed_runs[mode] = max(seed_runs.get(mode, a), a, key=lambda r: r.rate)
                pipe_runs[mode] = max(pipe_runs.get(mode, b), b, key=lambda r: r.rate)
    else:
        # Each side in a process of its own: a 15 GB float32 model freed inside a process
        # leaves its heap behind, and the other side would then be measured short of memory.
        if args.phase == "all":
            WORK.mkdir(parents=True, exist_ok=True)
            for phase in ("a", "b"):
                out = WORK / f"throughput-{phase}.json"
                subprocess.run(
                    [sys.executable, __file__, *sys.argv[1:], "--phase", phase, "--json-out", str(out)], check=True
                )
                for key, run in json.loads(out.read_text()).items():
                    (seed_runs if phase == "a" else pipe_runs)[key] = Run(**run)
            print()
            for key, run in pipe_runs.items():
                mode = key.split()[0]
                report(f"{args.model} {mode} ({settings[mode].num_beams} beam) {key.split()[1]}", seed_runs[mode], run)
            return
        runs: dict[str, Run] = {}
        t0 = time.perf_counter()
        if args.phase == "a":
            seed_model = load(args.model, "float32", args.device)
            print(f"built float32 model in {time.perf_counter() - t0:.0f}s", flush=True)
            for mode in modes:
                run_seed(seed_model, images[:1], GenerationSettings(num_beams=1, max_new_tokens=2, min_new_tokens=2))
                runs[mode] = run_seed(seed_model, images[:n_a], settings[mode])
                print(f"  a {mode}: {runs[mode].rate:.3f} img/s", flush=True)
        else:
            ours = load(args.model, args.dtype, args.device, prepack=not args.no_prepack)
            print(f"built {args.dtype} model in {time.perf_counter() - t0:.0f}s; {attention(ours.model)}", flush=True)
            batches = [int(b) for b in args.batches.split(",")] if args.batches else [args.batch]
            for mode in modes:
                for batch in batches:
                    n = args.images or batch
                    batch_images = (images + [jpeg(10_000 + i) for i in range(max(0, n - len(images)))])[:n]
                    # warm-up at the measured batch shape: oneDNN builds its kernels per shape
                    warm = GenerationSettings(num_beams=1, max_new_tokens=2, min_new_tokens=2)
                    run_pipeline(ours, batch_images[:batch], warm, batch, mapper, options)
                    run = run_pipeline(ours, batch_images, settings[mode], batch, mapper, options)
                    runs[f"{mode} x{batch}"] = run
                    peak = ""
                    if torch.cuda.is_available():
                        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
                        torch.cuda.reset_peak_memory_stats()
                    print(f"  b {mode} batch {batch}: {run.rate:.3f} img/s{peak}", flush=True)
        Path(args.json_out).write_text(json.dumps({k: dataclasses.asdict(v) for k, v in runs.items()}))
        return
    print()
    for mode in modes:
        report(f"{args.model} {mode} ({settings[mode].num_beams} beam)", seed_runs[mode], pipe_runs[mode])


if __name__ == "__main__":
    main()
