"""`consume` and `watch` with HEALTH_PORT, as real processes: the same /health and /metrics as
the API's, over a socket, so a fleet of workers can be probed and scraped (they had neither)."""

from __future__ import annotations

import base64
import os
import re
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import jsonschema
import pytest

from blip2_service import __version__
from blip2_service.amqp_topology import Topology
from blip2_service.http_api.openapi import openapi_document
from blip2_service.publisher import QueuePublisher

from ..conftest import AMQP_URL, delete_topology, image_bytes, port_open, service_missing, wait_until
from .test_serve_process import _free_port, _get, _stop


def _spawn(command: list[str], tmp_path: Path, data_dir: Path, **env: str) -> subprocess.Popen[bytes]:
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))},
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'probe.db'}",
        "MODEL": "tiny-random",
        "DTYPE": "float32",
        "NUM_BEAMS": "1",
        "MAX_NEW_TOKENS": "4",
        "AUTO_UPDATE": "false",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", *command],
        cwd=tmp_path,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def _metric(port: int, name: str, labels: str) -> float:
    """One sample of /metrics (0 before the series exists)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def _health(port: int) -> dict[str, object]:
    try:
        return _get(f"http://127.0.0.1:{port}/health")[1]
    except OSError:
        return {}


def _described(body: dict[str, object]) -> dict[str, object]:
    """`body`, once checked against the API description's Health schema (the probe's answers are
    the API's, and described as such)."""
    jsonschema.validate(body, openapi_document(__version__)["components"]["schemas"]["Health"])
    return body


@pytest.fixture
def broker() -> str:
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    return AMQP_URL


def test_a_worker_answers_health_and_metrics_on_health_port(broker: str, tmp_path: Path, data_dir: Path) -> None:
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    topology = Topology(name, f"{name}.results")
    port = _free_port()
    proc = _spawn(
        ["consume"],
        tmp_path,
        data_dir,
        BROKER_URL=broker,
        QUEUE_NAME=name,
        RESULTS_EXCHANGE=f"{name}.results",
        HEALTH_PORT=str(port),
        HEALTH_DETAILS="true",
    )
    publisher = QueuePublisher(broker, topology)
    try:
        wait_until(lambda: _health(port).get("status") == "healthy", 120, "the worker to be healthy")
        health = _described(_health(port))
        assert health["model_status"] == "loaded" and health["store"] == "up"
        sources = health["sources"]
        assert isinstance(sources, dict) and sources["queue"]["state"] == "connected"
        publisher.publish({"image_b64": base64.b64encode(image_bytes(90)).decode()})
        succeeded = ("blip2_queue_messages_total", 'outcome="succeeded"')
        wait_until(lambda: _metric(port, *succeeded) == 1.0, 60, "the worker to count the message")
        assert _metric(port, "blip2_stage_seconds_count", 'stage="infer"') >= 1  # the pipeline's own figures
        assert _get(f"http://127.0.0.1:{port}/v3/analyze")[0] == 404  # a probe, not the API
        code, out = _stop(proc)
        assert code == 0, out
        assert not port_open("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            _stop(proc)
        publisher.close()
        delete_topology(broker, name)


def test_a_publishing_watcher_is_healthy_without_a_model(broker: str, tmp_path: Path, data_dir: Path) -> None:
    """It loads no model, so "loaded" never comes: its health is the store's (and its broker's)."""
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    port = _free_port()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = _spawn(
        ["watch", str(inbox)],
        tmp_path,
        data_dir,
        BROKER_URL=broker,
        QUEUE_NAME=name,
        RESULTS_EXCHANGE=f"{name}.results",
        WATCH_MODE="publish",
        HEALTH_PORT=str(port),
    )
    try:
        wait_until(lambda: _health(port).get("status") == "healthy", 60, "the watcher to be healthy")
        assert _described(_health(port))["model_status"] == "none"
        code, out = _stop(proc)
        assert code == 0, out
    finally:
        if proc.poll() is None:
            _stop(proc)
        delete_topology(broker, name)


def test_a_watcher_whose_folder_is_gone_is_unhealthy_until_it_is_back(tmp_path: Path, data_dir: Path) -> None:
    """In `serve` a missing folder leaves the API serving (and healthy); a watcher process has no
    other work, so its probe says it is not doing it."""
    port = _free_port()
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    proc = _spawn(["watch", str(inbox)], tmp_path, data_dir, HEALTH_PORT=str(port), HEALTH_DETAILS="true")
    try:
        wait_until(lambda: _health(port).get("status") == "healthy", 120, "the watcher to be healthy")
        inbox.rmdir()
        wait_until(lambda: _health(port).get("status") == "unhealthy", 30, "the probe to see the folder gone")
        assert _described(_health(port))["unavailable"] == ["watch"]
        inbox.mkdir()
        wait_until(lambda: _health(port).get("status") == "healthy", 30, "the watcher to watch it again")
    finally:
        _stop(proc)


def test_a_health_port_in_use_is_one_line_and_a_non_zero_exit(tmp_path: Path, data_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "inbox").mkdir()
        proc = _spawn(["watch", str(tmp_path / "inbox")], tmp_path, data_dir, HEALTH_PORT=str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0
    lines = [line for line in out.decode().splitlines() if "HEALTH_PORT" in line]
    assert len(lines) == 1 and f":{port} for /health" in lines[0], out.decode()
    assert "Traceback" not in out.decode()
