#!/usr/bin/env bash
# Run HERE before a device call: the compiled decode under the GPU image's torch (2.11 by default,
# not the 2.13 the suite runs), on this CPU. A GPU session is 15 minutes; a version difference
# found there costs all of them.
#   bash bench/device_preflight.sh            (TORCH=2.11.0; ~5 GB into /tmp/device-venv, ~10 min)
# Checks: (1) a second thread can record CUDA graphs after prepare_compiling_thread (torch 2.11
# kept graph trees on the importing thread only: pytorch#123177); (2) bench/gpu_check.py --device
# cpu: the compiled static decode traces whole (fullgraph) and gives generate's captions for OPT
# and Flan-T5. BLIP is left out: torch 2.11's CPU (C++) inductor miscompiles its step ("tmp5 was not
# declared"), which says nothing of the GPU's Triton code; run it with MODELS=... to see.
# PyPI's torch wheel for Linux is the CUDA build; without a GPU its fake-tensor mode sets up a
# no-op CUDA device guard on every entry, which segfaults from a second thread, so the venv's
# sitecustomize does that once (a GPU machine never takes that path).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${TORCH:-2.11.0}
VENV=${VENV:-/tmp/device-venv}
MODELS=${MODELS:-tiny-random,tiny-random-t5}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import torch; assert torch.__version__.startswith('$TORCH')" 2>/dev/null; then
  rm -rf "$VENV"
  python3 -m venv "$VENV"
  PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q --index-url https://pypi.org/simple "torch==$TORCH"
  .venv/bin/python -m pip list --format=freeze 2>/dev/null | grep -viE '^(torch|nvidia|triton|cuda|blip2)' > "$VENV/pins.txt"
  PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q --no-deps -r "$VENV/pins.txt"
  PIP_CONSTRAINT= "$VENV/bin/python" -m pip install -q --no-deps -e .
  site=$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  printf '%s\n' 'import torch' 'torch._C._ensureCUDADeviceGuardSet()' \
    'torch._C._ensureCUDADeviceGuardSet = lambda: None  # see bench/device_preflight.sh' > "$site/sitecustomize.py"
fi
PY="$VENV/bin/python"
"$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
"$PY" - <<'EOF'
import threading
from torch._inductor import cudagraph_trees as trees
from blip2_service.captioner.static_decode import prepare_compiling_thread
trees.get_container(0)  # this thread imported them
errors = []
def second() -> None:
    try:
        prepare_compiling_thread()
        trees.get_container(0)
    except BaseException as exc:
        errors.append(repr(exc))
t = threading.Thread(target=second)
t.start(); t.join()
print("graph trees on a second thread:", errors[0] if errors else "ok")
raise SystemExit(1 if errors else 0)
EOF
"$PY" bench/gpu_check.py --device cpu --models "$MODELS" --data-dir "${DATA_DIR:-/tmp/device-preflight-data}" 2>&1 \
  | grep -vE '^W[0-9]{4} .*(cpp_extension|No CUDA runtime)'
