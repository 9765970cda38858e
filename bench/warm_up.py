"""What a start with COMPILE costs: `prepare_captioner` (the server's own warm-up) timed, with the
number of graphs dynamo compiled and where the compiling went (`torch._dynamo.utils.compile_times`).

  .venv/bin/python bench/warm_up.py --model tiny-random                  (~1.5 min cold here, 15 s warm)
  .venv/bin/python bench/warm_up.py --model full-random --buckets 1,2    (~10 min cold on 2 vCPUs, 24 GiB)
  --cache-dir DIR points inductor's on-disk cache at DIR (empty: a cold start; run twice: a restart).
Runs with whatever `blip2_service` is on PYTHONPATH, so two checkouts compare side by side.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--buckets", default="1,2,4,8,16,32,64")
    parser.add_argument("--beams", type=int, default=1)
    parser.add_argument("--cache-dir", type=Path, help="TORCHINDUCTOR_CACHE_DIR for this run")
    parser.add_argument("--data-dir", type=Path, default=Path("/tmp/blip2-bench/data"))
    args = parser.parse_args()
    if args.cache_dir:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(args.cache_dir.resolve())
    logging.basicConfig(level=logging.INFO, format="%(relativeCreated)8.0f ms %(message)s")
    for noisy in ("torch", "transformers", "alembic", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from torch._dynamo.utils import compile_times, counters

    from blip2_service.captioner.loading import load_model
    from blip2_service.config import Settings
    from blip2_service.runtime import prepare_captioner

    loaded = load_model(args.model, device=args.device, dtype=args.dtype, data_dir=args.data_dir)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        compile="on",
        compile_buckets=args.buckets,
        batch_max_size=max(int(b) for b in args.buckets.split(",")),
        num_beams=args.beams,
        max_new_tokens=12,
        min_new_tokens=1,
    )
    started = time.perf_counter()
    prepare_captioner(loaded, settings=settings)
    took = time.perf_counter() - started
    print(
        f"{args.model} {args.device} {args.dtype} buckets {args.buckets} beams {args.beams}: warm-up {took:.1f} s, "
        f"{counters['stats']['unique_graphs']} graphs compiled"
    )
    wanted = (
        "_compile.compile_inner",
        "OutputGraph.call_user_compiler",
        "fx_codegen_and_compile",
        "reinplace_inplaceable_ops",
        "compile_file",
        "build_guards",
    )
    for line in str(compile_times(repr="str", aggregate=True)).splitlines():
        if any(key in line for key in wanted):
            print("  " + line.strip())


if __name__ == "__main__":
    main()
