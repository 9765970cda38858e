# blip2-service: one image, two targets that differ only in the torch build.
#   docker build -t blip2-service .                         (cpu, the default target: last below)
#   docker build --target cuda -t blip2-service:cuda .
# BASE_IMAGE: any Debian-like image with or without Python 3.11 (python:3.11-slim-bookworm by
# default; CI builds FROM a debootstrap'd Debian). An `extra_ca` build secret (a CA bundle) is used
# for downloads when given:  --secret id=extra_ca,src=/etc/ssl/certs/ca-certificates.crt
# A torch wheel dropped into docker/wheels/ is installed instead of downloading one.
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/data DATABASE_URL=sqlite:////data/blip2.db HF_HOME=/models
RUN set -e; \
    if ! command -v python3 >/dev/null || ! python3 -c "import venv, ensurepip" 2>/dev/null; then \
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        python3 python3-venv ca-certificates >/dev/null && rm -rf /var/lib/apt/lists/*; \
    fi; \
    python3 -m venv /opt/venv; \
    useradd --system --create-home --uid 10001 blip2; \
    mkdir -p /data /inbox /models && chown blip2 /data /inbox /models
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
# What both targets run; each drops to the `blip2` user after installing.
VOLUME ["/data", "/inbox", "/models"]
EXPOSE 7777
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
  CMD python3 -c "import sys,urllib.request as u; sys.exit(0 if u.urlopen('http://127.0.0.1:7777/health', timeout=4).status == 200 else 1)"
ENTRYPOINT ["blip2-service"]
CMD ["serve"]

FROM base AS cuda
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# What COMPILE compiled at start-up (minutes for BLIP-2 on a first start) kept on the data volume:
# a re-created container, or a second worker sharing the volume, finds it there.
ENV TORCHINDUCTOR_CACHE_DIR=/data/compile-cache
RUN --mount=type=secret,id=extra_ca \
    if [ -s /run/secrets/extra_ca ]; then export PIP_CERT=/run/secrets/extra_ca; fi; \
    pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX" && pip install -q . && rm -rf /app/build
USER blip2

FROM base AS cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
COPY docker/wheels/ /tmp/wheels/
RUN --mount=type=secret,id=extra_ca \
    set -e; \
    if [ -s /run/secrets/extra_ca ]; then export PIP_CERT=/run/secrets/extra_ca; fi; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then pip install -q /tmp/wheels/torch-*.whl; \
    else pip install -q "$TORCH_SPEC" --index-url "$TORCH_INDEX"; fi; \
    pip install -q . && rm -rf /tmp/wheels /app/build
USER blip2
