"""The scale-out layout as processes, on the real RabbitMQ and Postgres: an HTTP gateway with no
model (INFERENCE=queue), two `consume` workers and a publishing watcher. 100 images through the
gateway, 100 dropped into the watched folder and 100 published directly: each captioned once,
in Postgres; and with no worker left, the gateway answers 503 with Retry-After."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text

from blip2_service.amqp_topology import Topology
from blip2_service.publisher import QueuePublisher

from ..conftest import AMQP_URL, delete_topology, image_bytes, port_open, service_missing, wait_until
from .test_serve_process import _free_port

pytestmark = pytest.mark.postgres


def _spawn(args: list[str], env: dict[str, str], cwd: Path, log: Path) -> subprocess.Popen[bytes]:
    out = log.open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", *args], env=env, cwd=cwd, stdout=out, stderr=out
    )


def _post(url: str, data: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "image/jpeg"})
    try:
        with urllib.request.urlopen(request, timeout=120) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _health(port: int) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return dict(json.loads(resp.read()))
    except urllib.error.HTTPError as exc:
        return dict(json.loads(exc.read()))
    except OSError:
        return {}


def _captions(pg_url: str) -> tuple[int, int]:
    engine = create_engine(pg_url.replace("postgresql+psycopg://", "postgresql+psycopg://", 1))
    try:
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT count(*), count(DISTINCT image_sha256) FROM blip2.captions WHERE status = 'succeeded'")
            ).one()
            return int(row[0]), int(row[1])
    except Exception:
        return 0, 0
    finally:
        engine.dispose()


def test_gateway_workers_and_a_publishing_watcher_caption_every_image_once(
    tmp_path: Path, data_dir: Path, pg_url: str
) -> None:
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    port = _free_port()
    base = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))},
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": pg_url,
        "BROKER_URL": AMQP_URL,
        "QUEUE_NAME": name,
        "RESULTS_EXCHANGE": f"{name}.results",
        "AUTO_UPDATE": "false",
        "MODEL": "tiny-random",
        "DTYPE": "float32",
        "NUM_BEAMS": "1",
        "MAX_NEW_TOKENS": "4",
        "FILE_ROOTS": str(inbox),
    }
    gateway = _spawn(
        ["serve"],
        {**base, "INFERENCE": "queue", "PORT": str(port), "GATEWAY_TIMEOUT": "120"},
        tmp_path,
        tmp_path / "g.log",
    )
    workers = [_spawn(["consume"], base, tmp_path, tmp_path / f"w{i}.log") for i in range(2)]
    watcher = _spawn(
        ["watch", str(inbox)],
        {**base, "WATCH_MODE": "publish", "WATCH_SETTLE_SECONDS": "0.3"},
        tmp_path,
        tmp_path / "p.log",
    )
    processes = [gateway, *workers, watcher]
    try:
        wait_until(lambda: _health(port).get("workers") == 2, 120, "the gateway to see two workers")
        assert _health(port)["status"] == "healthy" and _health(port)["model_status"] == "gateway"

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(lambda i: _post(f"http://127.0.0.1:{port}/v3/analyze", image_bytes(10_000 + i)), range(100))
            )
            for i in range(100):
                (inbox / f"f{i:03d}.jpg").write_bytes(image_bytes(20_000 + i))
            publisher = QueuePublisher(AMQP_URL, Topology(name, f"{name}.results"))
            for i in range(100):
                publisher.publish({"id": f"m{i}", "image_b64": base64.b64encode(image_bytes(30_000 + i)).decode()})
            publisher.close()
        for status, body, _headers in answers:
            assert status == 200, body
            assert body["service"] == "blip2" and body["status"] == "success"
            assert isinstance(body["predictions"][0]["text"], str) and body["metadata"]["record_id"]

        wait_until(lambda: _captions(pg_url)[0] >= 300, 240, "300 captions in Postgres")
        time.sleep(1.0)
        assert _captions(pg_url) == (300, 300)  # each image once

        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(60)
        wait_until(lambda: _health(port).get("workers") == 0, 30, "the gateway to see no worker")
        status, body, headers = _post(f"http://127.0.0.1:{port}/v3/analyze", image_bytes(40_000))
        assert status == 503 and "Retry-After" in headers and "consume" in body["error"]["message"]
        assert _health(port)["status"] == "unhealthy" and "workers" in _health(port)["unavailable"]
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in processes:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        delete_topology(AMQP_URL, name)
    for log in tmp_path.glob("*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log.read_text(errors="replace")[-3000:]
