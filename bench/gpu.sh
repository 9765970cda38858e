#!/usr/bin/env bash
# GPU throughput: full-random BLIP-2 OPT-2.7b (published shapes, random weights, no download),
# (a) the seed's float32 one-image loop vs (b) the pipeline in float16 at batch 1/8/32/64,
# greedy, 20 tokens. Installs nothing: run it where torch with CUDA and this package are importable
# (e.g. PYTHONPATH=src with the requirements present). Finishes in under 8 minutes on an H100.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:-}:$PWD/src"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))'
timeout 470 "$PY" bench/throughput.py --model full-random --device cuda --dtype float16 --decode greedy \
  --tokens 20 --seed-images 4 --batches 1,8,32,64 --images 64
