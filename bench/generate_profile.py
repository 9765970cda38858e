"""Where one `generate` spends its time: vision tower alone, `generate` called directly, through
the `Captioner`, per dtype and batch size, then a torch.profiler table of the largest batch.

Use it when `bench/throughput.py` shows a ratio you cannot explain: it separates the model's own
cost from the pipeline's, and the vision tower from the decode loop. Finishes in under 3 minutes
on a GPU with full-random, under 1 minute on a CPU with tiny-random:
  python bench/generate_profile.py --model full-random --device cuda --batches 1,8,64
  .venv/bin/python bench/generate_profile.py --model tiny-random --device cpu --batches 1,8
With --compile it also builds the static-cache decode (COMPILE=on, buckets = --batches) and times
it the same way: the "after" of the launch-bound decode.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).parent))
from blip2_service.captioner.generate import Captioner
from blip2_service.config import Settings
from blip2_service.domain import GenerationSettings
from blip2_service.imaging import decode_image
from blip2_service.runtime import prepare_captioner
from throughput import jpeg, load


def timed(fn: Callable[[], Any], repeats: int = 2) -> float:
    """Best of `repeats` after one warm-up, synchronised so GPU work is counted."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--model",
        choices=["tiny-random", "full-random", "tiny-random-blip", "blip-large-random"],
        default="tiny-random",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtypes", default="float16,float32", help="comma-separated dtypes to build and time")
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--tokens", type=int, default=20)
    parser.add_argument("--compile", action="store_true", help="also time the static-cache compiled decode")
    parser.add_argument("--profile-rows", type=int, default=18, help="rows of the profiler table (0: none)")
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    images = [decode_image(jpeg(i), max_file_size=10**8, max_image_pixels=10**8).image for i in range(max(batches))]

    for dtype in args.dtypes.split(","):
        profile_dtype(args, dtype, images, batches)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def time_batch(
    loaded: Any, captioner: Captioner, compiled: Captioner | None, images: list[Any], pixels: list[Any], tokens: int
) -> None:
    model, batch = loaded.model, len(images)
    settings = GenerationSettings(num_beams=1, max_new_tokens=tokens, min_new_tokens=tokens)
    pv = captioner.pixels.batch(pixels)
    proc = loaded.processor(images=images, return_tensors="pt").to(loaded.device, loaded.dtype)
    kw: dict[str, Any] = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False}
    one: dict[str, Any] = {"max_new_tokens": 1, "min_new_tokens": 1, "do_sample": False}
    with torch.inference_mode():
        vision = timed(lambda: model.vision_model(pixel_values=pv))
        direct = timed(lambda: model.generate(pixel_values=pv, **kw))
        with_ids = timed(lambda: model.generate(**proc, **kw))
        one_token = timed(lambda: model.generate(pixel_values=pv, **one))
    ours = timed(lambda: captioner.caption_batch(pixels, [settings] * batch))
    if compiled is not None:
        fast = timed(lambda: compiled.caption_batch(pixels, [settings] * batch))
        fast_one = timed(
            lambda: compiled.caption_batch(pixels, [dataclasses.replace(settings, max_new_tokens=1)] * batch)
        )
        print(
            f"  batch {batch:3d} COMPILE=on: Captioner {fast * 1000:8.1f} ms | 1 token {fast_one * 1000:8.1f} ms | "
            f"per decode step {(fast - fast_one) / max(1, tokens - 1) * 1000:6.2f} ms | {batch / fast:7.2f} img/s",
            flush=True,
        )
    per_step = (direct - one_token) / max(1, tokens - 1)
    print(
        f"  batch {batch:3d}: vision {vision * 1000:8.1f} ms | generate {direct * 1000:8.1f} ms "
        f"(with input_ids {with_ids * 1000:8.1f}) | 1 token {one_token * 1000:8.1f} ms | "
        f"per decode step {per_step * 1000:6.1f} ms | Captioner {ours * 1000:8.1f} ms | "
        f"{batch / ours:7.2f} img/s",
        flush=True,
    )


def profile_dtype(args: argparse.Namespace, dtype: str, images: list[Any], batches: list[int]) -> None:
    tokens = args.tokens
    loaded = load(args.model, dtype, args.device)
    model = loaded.model
    captioner = Captioner(loaded)
    compiled = None
    if args.compile:
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            compile="on",
            compile_buckets=",".join(map(str, batches)),
            batch_max_size=max(batches),
            num_beams=1,
            max_new_tokens=tokens,
            min_new_tokens=tokens,
        )
        started = time.perf_counter()
        compiled = prepare_captioner(loaded, settings=settings)
        print(f"  compiled decode warmed for batches {batches} in {time.perf_counter() - started:.1f}s", flush=True)
    pixels = [captioner.preprocess(image) for image in images]
    print(f"\n{args.model} {dtype} on {loaded.device}", flush=True)
    for batch in batches:
        time_batch(loaded, captioner, compiled, images[:batch], pixels[:batch], tokens)
    if not args.profile_rows:
        return
    batch = batches[-1]
    pv = captioner.pixels.batch(pixels[:batch])
    activities = [torch.profiler.ProfilerActivity.CPU]
    if loaded.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.inference_mode(), torch.profiler.profile(activities=activities) as prof:
        model.generate(pixel_values=pv, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if loaded.device.type == "cuda" else "self_cpu_time_total"
    print(f"  profile, batch {batch}, sorted by {key}:")
    print(prof.key_averages().table(sort_by=key, row_limit=args.profile_rows, max_name_column_width=60))
    if loaded.device.type == "cuda":
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10, max_name_column_width=60))


if __name__ == "__main__":
    main()
