#!/usr/bin/env bash
# GPU throughput: full-random BLIP-2 OPT-2.7b (published shapes, random weights, no download),
# (a) the seed's float32 one-image loop vs (b) the pipeline in float16 at batch 1/8/16/32/64,
# greedy 20 tokens, then beam 5, then tiny-random (pipeline overhead on a GPU host).
# Installs nothing: run it where torch with CUDA and this package's requirements are importable
# (PYTHONPATH=src is added here). Each step has its own time limit; the whole script finishes in
# under 8 minutes on an H100/H200. Logs go to $OUT (or ./bench-gpu-logs) as well as stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-bench-gpu-logs}
mkdir -p "$LOGS"
export PYTHONPATH="${PYTHONPATH:-}:$PWD/src" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda,
  torch.cuda.get_device_name(0), "transformers", transformers.__version__, "cpus", __import__("os").cpu_count())' || exit 1

step() {  # step NAME SECONDS ARGS...: one bench run, its log kept even when it fails or times out
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$PY" bench/throughput.py "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

STEPS=${*:-greedy beam tiny}  # or name some: bench/gpu.sh greedy
for s in $STEPS; do
  case $s in
    greedy) step greedy 150 --model full-random --device cuda --dtype float16 --decode greedy \
      --tokens 20 --seed-images 8 --batches 1,8,16,32,64 --images 64 --show-batches ;;
    beam) step beam 90 --model full-random --device cuda --dtype float16 --decode beam \
      --tokens 20 --seed-images 4 --batches 8,32 --images 32 --show-batches ;;
    tiny) step tiny 60 --model tiny-random --device cuda --dtype float16 --decode greedy --batch 8 --images 128 ;;
    *) echo "unknown step $s (greedy, beam, tiny)"; exit 2 ;;
  esac
done
