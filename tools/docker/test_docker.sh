#!/usr/bin/env bash
# make test-docker: build the image and bring the compose stack up on a real Docker engine, then
# check it end to end (tools/docker/check_stack.py): 20 images dropped into ./inbox, 20 POSTs to
# the gateway, 20 messages published; every image captioned once, in Postgres, by tiny-random
# workers, one of which is killed mid-run; `down` leaves no container.
# No registry is reachable here: the base image is debootstrap'd Debian (docker import), and the CI
# override builds Postgres and RabbitMQ from it with Debian's packages. Prints its own timings.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
stamp() { echo "[test-docker $(( $(date +%s) - start ))s] $*"; }
DOCKER=/usr/bin/docker  # Debian's docker.io client (BuildKit built in)
BASE=blip2-base:bookworm
PROJECT=blip2ci
export BASE_IMAGE=$BASE GATEWAY_PORT=17777 CI_PG_PORT=35432 CI_AMQP_PORT=35672 MODEL=tiny-random
COMPOSE=(docker-compose -f docker-compose.yml -f docker/ci/docker-compose.ci.yml -p "$PROJECT")

if [ ! -x "$DOCKER" ] || ! command -v docker-compose >/dev/null || ! command -v debootstrap >/dev/null; then
  stamp "installing docker.io, docker-compose, debootstrap"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io docker-compose debootstrap >/dev/null
fi
if ! "$DOCKER" info >/dev/null 2>&1; then
  stamp "starting dockerd"
  (dockerd >/tmp/blip2-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do "$DOCKER" info >/dev/null 2>&1 && break; sleep 1; done
  "$DOCKER" info >/dev/null
fi
if ! "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  stamp "building the base image with debootstrap"
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >/dev/null
  tar -C "$root" -c . | "$DOCKER" import - "$BASE" >/dev/null
  rm -rf "$root"
fi
cp /opt/wheels/torch-*.whl docker/wheels/ 2>/dev/null || true  # a local torch wheel, when this machine has one

stamp "building blip2-service:cpu"
DOCKER_BUILDKIT=1 "$DOCKER" build -q --build-arg BASE_IMAGE="$BASE" \
  --secret id=extra_ca,src=/etc/ssl/certs/ca-certificates.crt --target cpu -t blip2-service:cpu . >/dev/null
stamp "building the CI Postgres and RabbitMQ images"
"${COMPOSE[@]}" build -q postgres rabbitmq >/dev/null

mkdir -p inbox
rm -f inbox/stack-*.jpg
cleanup() { "${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1 || true; rm -f inbox/stack-*.jpg; }
trap cleanup EXIT
stamp "compose up (2 workers)"
"${COMPOSE[@]}" up -d --no-build --scale worker=2 >/dev/null 2>&1
PY=${PYTHON:-.venv/bin/python}
"$PY" tools/docker/check_stack.py --project "$PROJECT" --docker "$DOCKER"
stamp "compose down"
"${COMPOSE[@]}" down -v --remove-orphans >/dev/null 2>&1
left=$("$DOCKER" ps -aq --filter "label=com.docker.compose.project=$PROJECT")
if [ -n "$left" ]; then echo "containers left after down: $left"; exit 1; fi
trap - EXIT
rm -f inbox/stack-*.jpg
stamp "passed"
