"""The end-to-end check of `make test-docker` against the running compose stack (see test_docker.sh).

20 images dropped into ./inbox (the watcher publishes them), 20 POSTs to the gateway, 20 messages
published straight to the queue, one worker container killed halfway: every image must be
captioned exactly once, in Postgres. Prints its own timings; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures
import io
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
from kombu import Connection
from PIL import Image
from sqlalchemy import create_engine, text

GATEWAY = "http://127.0.0.1:17777"
AMQP = "amqp://guest:guest@127.0.0.1:35672//"
PG = "postgresql+psycopg://blip2:blip2@127.0.0.1:35432/blip2"
STARTED = time.monotonic()


def say(message: str) -> None:
    print(f"[check-stack {time.monotonic() - STARTED:5.1f}s] {message}", flush=True)


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (72, 96, 3), dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def wait(check, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:
            pass
        time.sleep(1)
    raise SystemExit(f"timed out after {timeout:.0f}s waiting for {what}")


def health() -> dict:  # type: ignore[type-arg]
    try:
        with urllib.request.urlopen(GATEWAY + "/health", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))


def post(data: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(
        GATEWAY + "/v3/analyze", data=data, method="POST", headers={"Content-Type": "image/jpeg"}
    )
    with urllib.request.urlopen(request, timeout=120) as resp:
        return resp.status, json.loads(resp.read())


def captions() -> tuple[int, int]:
    engine = create_engine(PG)
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT count(*), count(DISTINCT image_sha256) FROM blip2.captions WHERE status = 'succeeded'")
            ).one()
            return int(row[0]), int(row[1])
    finally:
        engine.dispose()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--project", default="blip2ci")
    parser.add_argument("--docker", default="/usr/bin/docker")
    args = parser.parse_args()

    wait(
        lambda: health().get("workers") == 2 and health().get("status") == "healthy",
        600,
        "two workers behind a healthy gateway",
    )
    say(f"stack healthy: {health().get('workers')} workers")

    # The workers and the watcher answer /health on HEALTH_PORT, so the image's HEALTHCHECK covers
    # them too (they had none: a worker stuck loading looked the same as a working one).
    def docker_health(container: str) -> str:
        done = subprocess.run(
            [args.docker, "inspect", "-f", "{{.State.Health.Status}}", container], capture_output=True, text=True
        )
        return done.stdout.strip()

    probed = [f"{args.project}_worker_1", f"{args.project}_worker_2", f"{args.project}_watcher_1"]
    wait(lambda: all(docker_health(c) == "healthy" for c in probed), 180, "Docker to see workers and watcher healthy")
    say(f"Docker reports {', '.join(probed)} healthy (HEALTH_PORT)")

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, (jpeg(100 + i) for i in range(20))))
    bad = [body for status, body in answers if status != 200 or body.get("status") != "success"]
    if bad:
        raise SystemExit(f"gateway answers not in the legacy success shape: {bad[:2]}")
    say("20 POSTs to the gateway answered 200 in the legacy shape")

    inbox = Path("inbox")
    for i in range(20):
        (inbox / f"stack-{i:02d}.jpg").write_bytes(jpeg(200 + i))
    say("20 images dropped into ./inbox")

    with Connection(AMQP) as conn:
        producer = conn.Producer()
        for i in range(20):
            if i == 10:
                victim = f"{args.project}_worker_1"
                subprocess.run([args.docker, "kill", victim], check=True, capture_output=True)
                say(f"killed {victim} mid-run")
            producer.publish(
                {"id": f"m{i}", "image_b64": base64.b64encode(jpeg(300 + i)).decode()},
                routing_key="blip2.images",
                serializer="json",
                delivery_mode=2,
            )
    say("20 messages published")

    wait(lambda: captions()[0] >= 60, 600, "60 captions in Postgres")
    time.sleep(3)
    total, distinct = captions()
    if (total, distinct) != (60, 60):
        raise SystemExit(f"expected 60 images captioned once each, found {total} captions of {distinct} images")
    say("every image captioned exactly once: 60 captions of 60 images in Postgres")
    return 0


if __name__ == "__main__":
    sys.exit(main())
