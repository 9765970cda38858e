"""Before timing anything on a lent GPU: does the compiled static-cache decode give the captions
`generate` gives there? Each family's tiny model (OPT, Flan-T5, BLIP) in float32 (where both do the
same arithmetic), greedy and beam, batches that are padded and split, with the CUDA graphs recorded
(COMPILE=on).

  python bench/gpu_check.py --device cuda        (bench/gpu.sh runs it first)
  .venv/bin/python bench/gpu_check.py --device cpu  (the same check here, inductor without graphs)
Prints one line per case and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

from blip2_service.captioner.generate import Captioner
from blip2_service.captioner.loading import load_model
from blip2_service.config import Settings
from blip2_service.domain import GenerationSettings
from blip2_service.runtime import prepare_captioner


def _images(n: int) -> list[Image.Image]:
    out = []
    for i in range(n):
        rng = np.random.default_rng(500 + i)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(buf, format="JPEG")
        out.append(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/blip2-bench/data"))
    parser.add_argument("--models", default="tiny-random,tiny-random-t5,tiny-random-blip")
    args = parser.parse_args()
    failures = 0
    for name in args.models.split(","):
        failures += check(name, args.device, args.data_dir)
    # A graph torch could not record runs eagerly and silently (an input it did not expect to be
    # mutated, a CPU tensor): correct captions, none of the speed. Counted, so this run says so.
    from torch._dynamo.utils import counters

    skips = counters["inductor"]["cudagraph_skips"]
    print(f"CUDA graphs skipped: {skips} (0 expected on CUDA; always 0 on a CPU, which records none)", flush=True)
    return 1 if failures or (skips and args.device.startswith("cuda")) else 0


def check(name: str, device: str, data_dir: Path) -> int:
    """How many of the model's batch/beam cases differ from `generate`."""
    loaded = load_model(name, device=device, dtype="float32", data_dir=data_dir)
    plain = Captioner(loaded)
    failures = 0
    for beams in (1, 3):
        settings = Settings(
            _env_file=None,  # type: ignore[call-arg]
            compile="on",
            compile_buckets="1,2,4,8",
            batch_max_size=8,
            num_beams=beams,
            max_new_tokens=12,
            min_new_tokens=1,
        )
        started = time.perf_counter()
        compiled = prepare_captioner(loaded, settings=settings)
        warm = time.perf_counter() - started
        for size in (1, 3, 11):
            pixels = [plain.preprocess(im) for im in _images(size)]
            gen = [GenerationSettings(num_beams=beams, max_new_tokens=12, min_new_tokens=1)] * size
            expected = plain.caption_batch(pixels, gen)
            t0 = time.perf_counter()
            got = compiled.caption_batch(pixels, gen)
            took = time.perf_counter() - t0
            same = got == expected
            failures += 0 if same else 1
            print(
                f"{name} {device} beams={beams} batch={size:2d}: {'same' if same else 'DIFFERENT'} captions, "
                f"compiled {1000 * took:.1f} ms (warm-up {warm:.1f}s)",
                flush=True,
            )
            if not same:
                print(f"   generate: {expected}\n   compiled: {got}", flush=True)
    return failures


if __name__ == "__main__":
    sys.exit(main())
