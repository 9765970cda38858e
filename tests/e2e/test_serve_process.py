"""`blip2-service serve` as a real process: what `make run` starts, driven over HTTP like curl would."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from ..conftest import image_bytes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _post_multipart(url: str, data: bytes) -> tuple[int, dict[str, Any]]:
    boundary = "----blip2test"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="some.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=60) as resp:
        return resp.status, json.loads(resp.read())


def _start(tmp_path: Path, data_dir: Path, **env: str) -> tuple[subprocess.Popen[bytes], int]:
    port = _free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))},
        "PORT": str(port),
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}",
        "WATCH_DIRS": str(tmp_path / "inbox"),
        "AUTO_UPDATE": "false",
        "HEALTH_DETAILS": "true",  # these tests read the watcher's state from /health
        **env,
    }
    (tmp_path / "inbox").mkdir(exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "serve"],
        cwd=tmp_path,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return proc, port


def _wait_for(port: int, model_status: set[str], timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            _status, last = _get(f"http://127.0.0.1:{port}/health")
            if last.get("model_status") in model_status:
                return last
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        time.sleep(0.3)
    raise AssertionError(f"service never reached {model_status}: {last}")


def _stop(proc: subprocess.Popen[bytes]) -> tuple[int, str]:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
    return proc.returncode, out.decode(errors="replace")


def test_serve_with_tiny_random_answers_curl_and_stops_cleanly(tmp_path: Path, data_dir: Path) -> None:
    proc, port = _start(tmp_path, data_dir, MODEL="tiny-random", NUM_BEAMS="2", MAX_NEW_TOKENS="8")
    try:
        health = _wait_for(port, {"loaded", "failed"})
        assert health["status"] == "healthy", health
        deadline = time.monotonic() + 30  # the watcher starts once the model is loaded
        while "watch" not in health.get("sources", {}) and time.monotonic() < deadline:
            time.sleep(0.2)
            health = _get(f"http://127.0.0.1:{port}/health")[1]
        watch = health["sources"]["watch"]
        assert watch["state"] == "running" and watch["mode"] == "caption"
        assert list(watch["folders"].values()) == ["inotify"]
        status, body = _post_multipart(f"http://127.0.0.1:{port}/v3/analyze", image_bytes(3))
        assert status == 200
        assert body["service"] == "blip2" and body["status"] == "success"
        assert body["predictions"][0]["text"]
        assert body["metadata"]["model_info"]["framework"].startswith("BLIP2")
    finally:
        code, log = _stop(proc)
    assert code == 0, log
    assert "stopped" in log


def test_a_default_start_without_weights_reports_what_to_do(tmp_path: Path, data_dir: Path) -> None:
    # The default MODEL with an empty cache and downloads off (no network here either way).
    proc, port = _start(tmp_path, data_dir, MODEL_DIR=str(tmp_path / "empty-cache"), MODEL_DOWNLOAD="false")
    try:
        health = _wait_for(port, {"failed"}, timeout=60)
        status, body = _get(f"http://127.0.0.1:{port}/health")
        assert status == 503
        assert body["status"] == "unhealthy" and body["model_status"] == "failed"
        assert "Salesforce/blip2-opt-2.7b" in body["error"] and "MODEL_DIR" in body["error"]
        status, analyzed = _get(f"http://127.0.0.1:{port}/v3/analyze?url=http://example.com/a.jpg")
        assert status == 503 and "failed to load" in analyzed["error"]["message"]
        del health
    finally:
        code, _log = _stop(proc)
    assert code == 0


@pytest.mark.parametrize("bad", [{"PORT": "seventy"}, {"DTYPE": "int4"}])
def test_a_bad_setting_stops_the_start_with_one_line(tmp_path: Path, bad: dict[str, str]) -> None:
    env = {**os.environ, **bad}
    result = subprocess.run(
        [sys.executable, "-m", "blip2_service.cli", "serve"], cwd=tmp_path, env=env, capture_output=True, timeout=60
    )
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    name, value = next(iter(bad.items()))
    assert f"{name}='{value}'" in lines[0]


def test_out_of_file_descriptors_the_log_says_so_once_a_minute_not_once_a_failed_accept(
    tmp_path: Path, data_dir: Path
) -> None:
    # MAX_CONNECTIONS set over what the open-file limit allows: accept() itself fails (EMFILE),
    # which asyncio logs with a traceback, many times a second, for as long as it lasts.
    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (160, 160))

    port = _free_port()
    log_path = tmp_path / "serve.log"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))},
        **{"PORT": str(port), "DATA_DIR": str(data_dir), "MODEL": "tiny-random", "MAX_CONNECTIONS": "1000"},
        **{"DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}", "AUTO_UPDATE": "false", "REQUEST_TIMEOUT": "30"},
    }
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "blip2_service.cli", "serve"],
            cwd=tmp_path,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            preexec_fn=low_limit,
        )
    held: list[socket.socket] = []
    try:
        _wait_for(port, {"loaded"})
        for _ in range(300):  # more than the process can hold, until the listen backlog is full too
            try:
                conn = socket.create_connection(("127.0.0.1", port), timeout=1)
            except TimeoutError:
                break
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            held.append(conn)
        deadline = time.monotonic() + 30
        while b"cannot accept HTTP connections" not in log_path.read_bytes() and time.monotonic() < deadline:
            time.sleep(0.1)
        # Not a wait for something to happen: the first failed accept already logs ~100 tracebacks
        # unfiltered. This holds the process out of descriptors past asyncio's 1 s accept retry,
        # so the stop below meets retries still pending.
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)  # stopped while still out of descriptors
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        for conn in held:
            conn.close()
    log = log_path.read_text(errors="replace")
    assert log.count("cannot accept HTTP connections: [Errno 24] Too many open files") == 1, log[-3000:]
    assert "out of system resource" not in log and len(log.splitlines()) < 30, log[-3000:]
    assert code == 0, log[-3000:]


def _sigterm_once_logged(
    args: list[str], tmp_path: Path, data_dir: Path, extra: dict[str, str], logged: str, within: float
) -> tuple[int, str]:
    """Start `blip2-service ARGS` on tiny-random, send SIGTERM once its log says `logged`, and
    return its exit code (it must end `within` seconds of the signal) and its whole log."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))},
        **{"PORT": str(_free_port()), "DATA_DIR": str(data_dir), "MODEL": "tiny-random"},
        **{"DATABASE_URL": f"sqlite:///{tmp_path / 'e2e.db'}", "AUTO_UPDATE": "false"},
        **extra,
    }
    log_path = tmp_path / "out.log"
    with log_path.open("wb") as log_file:
        argv = [sys.executable, "-m", "blip2_service.cli", *args]
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=log_file, stderr=log_file)
    try:
        deadline = time.monotonic() + 120
        while logged not in log_path.read_text(errors="replace") and time.monotonic() < deadline:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=within)
    finally:
        if proc.poll() is None:
            proc.kill()
    return code, log_path.read_text(errors="replace")


@pytest.mark.parametrize("command", ["serve", "watch"])
def test_a_sigterm_while_the_compiled_step_warms_ends_the_process_at_once_and_cleanly(
    tmp_path: Path, data_dir: Path, command: str
) -> None:
    # The loader thread cannot be interrupted; left running into the interpreter's shutdown it
    # failed with a traceback and the process aborted (SIGABRT) seconds later.
    (tmp_path / "inbox").mkdir()
    args = ["serve"] if command == "serve" else ["watch", str(tmp_path / "inbox")]
    # float32: on a CPU with native bfloat16 (AMX), DTYPE=auto prepacks the layers for oneDNN
    # and COMPILE=on decodes through generate, with no warm-up to interrupt.
    compiled = {"COMPILE": "on", "DTYPE": "float32"}
    code, log = _sigterm_once_logged(args, tmp_path, data_dir, compiled, "warming the compiled decode step", 30)
    assert code == 0, log[-3000:]
    assert "stopped while the model was still warming: not waiting for it" in log
    assert "Traceback" not in log and "terminate called" not in log, log[-3000:]


def _dead_broker() -> str:
    """A broker URL nothing listens on: every connect is refused at once."""
    return f"amqp://guest:guest@127.0.0.1:{_free_port()}//"


@pytest.mark.parametrize(
    ("command", "extra", "waiting", "said"),
    [
        ("serve", {"LISTEN_AFTER_LOAD": "true", "COMPILE": "on", "DTYPE": "float32"}, "for the model", "before"),
        ("serve", {"BROKER_URL": "dead"}, "waiting for the broker", "before the broker was reached"),
        ("consume", {"BROKER_URL": "dead"}, "waiting for the broker", "before the broker was reached"),
    ],
    ids=["serve-listen-after-load", "serve-broker-away", "consume-broker-away"],
)
def test_a_sigterm_before_it_listens_or_consumes_ends_it_at_once_with_0(
    tmp_path: Path, data_dir: Path, command: str, extra: dict[str, str], waiting: str, said: str
) -> None:
    """Before: the default SIGTERM action killed serve with 143 and no log line while it waited
    for the model (LISTEN_AFTER_LOAD) or the broker, and the broker waits ran on to STARTUP_TIMEOUT."""
    env = {"STARTUP_TIMEOUT": "300", **{k: _dead_broker() if v == "dead" else v for k, v in extra.items()}}
    code, log = _sigterm_once_logged([command], tmp_path, data_dir, env, waiting, 60)  # not STARTUP_TIMEOUT later
    assert code == 0, log[-3000:]
    assert said in log and "Traceback" not in log, log[-3000:]
