#!/usr/bin/env bash
# Run HERE (not on the GPU machine) before a device call: downloads into .whl/ the wheels that the
# device image (Python 3.12, torch 2.11 cu130, transformers 5.17) lacks or has at another version,
# pinned to what the tests here ran with. bench/gpu.sh installs them there into /tmp/site.
# The device tool carries .whl when the call names it in `carry` (64 MiB limit: this is ~30 MiB).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
rm -rf .whl && mkdir -p .whl
PY=${PYTHON:-.venv/bin/python}
# name==version from this venv, so the GPU runs the versions the suite tested
pins=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(transformers|huggingface[-_]hub|tokenizers|sqlalchemy|alembic|mako|pydantic|pydantic[-_]core|pydantic[-_]settings|python[-_]dotenv|typing[-_]inspection|annotated[-_]types|psycopg|psycopg[-_]binary|kombu|amqp|vine|watchdog|lemminflect|greenlet|py[-_]spy)==')
for pin in $pins; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "$pin" \
    || { echo "no wheel for $pin"; exit 1; }
done
du -sh .whl
