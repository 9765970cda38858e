#!/usr/bin/env bash
# GPU figures in two device calls, each under 10 minutes, the targets first: `gpu.sh check serve blip`
# (about 9 minutes at most), then `gpu.sh profile profile-blip` if device time is left.
# full-random BLIP-2 OPT-2.7b (published shapes, random weights, no download), float16, 20 tokens. Steps:
#   check    the compiled static decode gives generate's captions on this GPU (OPT, T5, BLIP tiny, fp32)
#   profile  the decode step before/after: generate vs the compiled static-cache decode (batch 1/16/64)
#   profile-blip  the same for blip-large-random (batch 1/16)
#   serve    the real server (HTTP, SQLite), greedy and beam 5: single-image p50/p90, 64 clients,
#            GPU utilisation, start-up, peak memory, the server's CPU and GIL per image (py-spy),
#            and the in-process Captioner at the same batch
#   blip     the same server with blip-large-random (the legacy service's model shapes), greedy
# Older steps by name: greedy, beam, tiny (bench/throughput.py's seed-vs-pipeline sweep).
# Wheels: run bench/gpu_wheels.sh here first and carry .whl; they are installed into /tmp/site.
# Each step has its own time limit. Logs go to $OUT (or ./bench-gpu-logs) as well as stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOGS=${OUT:-bench-gpu-logs}
mkdir -p "$LOGS"
if [ -d .whl ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
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

run() {  # run NAME SECONDS SCRIPT ARGS...
  local name=$1 limit=$2 script=$3
  shift 3
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$PY" "$script" "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]}"
}

STEPS=${*:-check serve blip profile profile-blip}  # or name some: bench/gpu.sh serve
for s in $STEPS; do
  case $s in
    check) run check 120 bench/gpu_check.py --device cuda ;;
    profile) run profile 120 bench/generate_profile.py --model full-random --device cuda --dtypes float16 \
      --batches 1,16,64 --compile --profile-rows 0 ;;
    profile-blip) run profile-blip 100 bench/generate_profile.py --model blip-large-random --device cuda \
      --dtypes float16 --batches 1,16 --compile --profile-rows 0 ;;
    serve) run serve 280 bench/gpu_serve.py --model full-random --device cuda --dtype float16 --tokens 20 \
      --decode greedy,beam --clients 64 --seconds 15 --single 20 --batch-max 64 --gil ;;
    blip) run blip 150 bench/gpu_serve.py --model blip-large-random --device cuda --dtype float16 --tokens 20 \
      --decode greedy --clients 16 --seconds 5 --single 20 --batch-max 16 --no-inprocess ;;
    greedy) step greedy 150 --model full-random --device cuda --dtype float16 --decode greedy \
      --tokens 20 --seed-images 8 --batches 1,8,16,32,64 --images 64 --show-batches ;;
    beam) step beam 90 --model full-random --device cuda --dtype float16 --decode beam \
      --tokens 20 --seed-images 4 --batches 8,32 --images 32 --show-batches ;;
    tiny) step tiny 60 --model tiny-random --device cuda --dtype float16 --decode greedy --batch 8 --images 128 ;;
    *) echo "unknown step $s (check, profile, profile-blip, serve, blip, greedy, beam, tiny)"; exit 2 ;;
  esac
done
