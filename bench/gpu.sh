#!/usr/bin/env bash
# GPU figures, the targets first, in as many steps as fit one device call:
#   DEADLINE=540 bash bench/gpu.sh serve-greedy check-opt serve-beam      (first call)
#   DEADLINE=540 bash bench/gpu.sh check blip profile profile-blip       (a second, if time is left)
# Steps run in the order named; each gets its own limit or what is left of DEADLINE seconds
# (counted from this script's start), whichever is less, and is skipped with under 60 s left.
# Compiling is the unknown: full-random's three compiled stages took ~8 minutes of one CPU core to
# compile here (bench/RESULTS.md); the first server start pays it, later ones in the same call find
# most of it in inductor's on-disk cache, so the greedy server goes first.
# full-random BLIP-2 OPT-2.7b (published shapes, random weights, no download), float16, 20 tokens. Steps:
#   serve-greedy  the real server (HTTP, SQLite), greedy: single-image p50/p90, 64 clients, GPU
#            utilisation, start-up, peak memory, the server's CPU and GIL per image (py-spy), and
#            the in-process Captioner at the same batch
#   serve-beam    the same for beam 5, without the in-process figure
#   serve    both, as one step
#   check-opt     the compiled static decode gives generate's captions on this GPU (OPT tiny, fp32)
#   check    the same for all three families (OPT, Flan-T5, BLIP)
#   blip     the server with blip-large-random (the legacy service's model shapes), greedy
#   profile  the decode step before/after: generate vs the compiled static-cache decode (batch 1/16/64)
#   profile-blip  the same for blip-large-random (batch 1/16)
# Older steps by name: greedy, beam, tiny (bench/throughput.py's seed-vs-pipeline sweep).
# Wheels: run bench/gpu_wheels.sh here first and carry .whl; they are installed into /tmp/site.
# Before a session, bench/device_preflight.sh runs the compiled decode under the image's torch here.
# Logs go to $OUT (or ./bench-gpu-logs) as well as stdout.
# Rehearse the same script here first (minutes), with .whl moved aside (its wheels are the device's
# Python 3.12 ones, which pip refuses here):
#   DEVICE=cpu DTYPE=float32 MODEL=tiny-random PYTHON=.venv/bin/python DEADLINE=400 bash bench/gpu.sh serve-greedy check-opt
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
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU", "transformers", transformers.__version__,
  "cpus", __import__("os").cpu_count())' || exit 1
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-float16}
MODEL=${MODEL:-full-random}

DEADLINE=${DEADLINE:-540}
started=$SECONDS

run() {  # run NAME SECONDS SCRIPT ARGS...: one bench run, its log kept even when it fails or times out
  local name=$1 limit=$2 script=$3
  shift 3
  local left=$((DEADLINE - (SECONDS - started)))
  if [ "$left" -lt 60 ]; then
    echo "=== $name skipped: ${left}s left of DEADLINE=${DEADLINE}"
    return
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "=== $name (limit ${limit}s, at $((SECONDS - started))s)"
  timeout "$limit" "$PY" "$script" "$@" 2>&1 | tee "$LOGS/$name.log"
  echo "=== $name exit ${PIPESTATUS[0]} after $((SECONDS - started))s"
}

step() {  # step NAME SECONDS ARGS...: bench/throughput.py
  local name=$1 limit=$2
  shift 2
  run "$name" "$limit" bench/throughput.py "$@"
}

SERVE=(bench/gpu_serve.py --model "$MODEL" --device "$DEVICE" --dtype "$DTYPE" --tokens 20 --clients 64 --seconds 15
  --single 20 --batch-max 64 --gil --compile on)
STEPS=${*:-serve-greedy check-opt serve-beam}  # or name some: bench/gpu.sh serve
for s in $STEPS; do
  case $s in
    serve-greedy) run serve-greedy 540 "${SERVE[@]}" --decode greedy ;;
    serve-beam) run serve-beam 300 "${SERVE[@]}" --decode beam --no-inprocess ;;
    serve) run serve 560 "${SERVE[@]}" --decode greedy,beam ;;
    check-opt) run check-opt 150 bench/gpu_check.py --device "$DEVICE" --models tiny-random ;;
    check) run check 240 bench/gpu_check.py --device "$DEVICE" ;;
    profile) run profile 300 bench/generate_profile.py --model "$MODEL" --device "$DEVICE" --dtypes "$DTYPE" \
      --batches 1,16,64 --compile --profile-rows 0 ;;
    profile-blip) run profile-blip 240 bench/generate_profile.py --model blip-large-random --device "$DEVICE" \
      --dtypes "$DTYPE" --batches 1,16 --compile --profile-rows 0 ;;
    blip) run blip 300 bench/gpu_serve.py --model blip-large-random --device "$DEVICE" --dtype "$DTYPE" --tokens 20 \
      --decode greedy --clients 16 --seconds 5 --single 20 --batch-max 16 --no-inprocess ;;
    greedy) step greedy 150 --model full-random --device cuda --dtype float16 --decode greedy \
      --tokens 20 --seed-images 8 --batches 1,8,16,32,64 --images 64 --show-batches ;;
    beam) step beam 90 --model full-random --device cuda --dtype float16 --decode beam \
      --tokens 20 --seed-images 4 --batches 8,32 --images 32 --show-batches ;;
    tiny) step tiny 60 --model tiny-random --device cuda --dtype float16 --decode greedy --batch 8 --images 128 ;;
    *) echo "unknown step $s (serve-greedy, serve-beam, serve, check-opt, check, blip, profile, profile-blip," \
      "greedy, beam, tiny)"; exit 2 ;;
  esac
done
