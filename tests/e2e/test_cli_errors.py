"""Every error a user can cause at the command line is one line on stderr and a non-zero exit."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ..tcp_proxy import TcpProxy
from .test_cli import _cli, _env


def _dead_port() -> int:
    """A port nothing listens on: connections to it are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(done: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert done.returncode != 0, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("blip2-service"), done.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def test_version_and_help_say_what_each_command_is_for(tmp_path: Path, data_dir: Path) -> None:
    env = _env(tmp_path, data_dir)
    version = _cli("--version", env=env, cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("blip2-service ")
    for command in ("serve", "watch", "consume", "caption", "publish", "db", "emoji"):
        shown = _cli(command, "--help", env=env, cwd=tmp_path)
        assert shown.returncode == 0
        assert "example:" in shown.stdout and "settings that matter here:" in shown.stdout, command
        assert f"blip2-service {command}" in shown.stdout.split("example:")[1]


def test_unknown_options_and_missing_arguments_are_one_line(tmp_path: Path, data_dir: Path) -> None:
    env = _env(tmp_path, data_dir)
    _one_line(_cli("--bogus", env=env, cwd=tmp_path), "unknown option --bogus", "--help")
    _one_line(_cli("caption", env=env, cwd=tmp_path), "PATH", "caption --help")


def test_a_model_that_cannot_load_is_one_line_with_what_to_do(tmp_path: Path, data_dir: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    env = _env(tmp_path, data_dir, MODEL=str(tmp_path / "no-model"), MODEL_DOWNLOAD="false")
    _one_line(_cli("caption", str(tmp_path / "a.jpg"), env=env, cwd=tmp_path), "Cannot load")


def test_a_busy_port_is_one_line_naming_port(tmp_path: Path, data_dir: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("0.0.0.0", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = _cli("serve", env=_env(tmp_path, data_dir, PORT=str(port)), cwd=tmp_path)
    _one_line(done, f":{port}", "PORT")


def test_watch_dirs_that_do_not_exist_stop_the_start(tmp_path: Path, data_dir: Path) -> None:
    done = _cli("serve", env=_env(tmp_path, data_dir, WATCH_DIRS=str(tmp_path / "typo")), cwd=tmp_path)
    _one_line(done, "WATCH_DIRS", "typo")
    assert not (tmp_path / "typo").exists()


@pytest.mark.postgres
def test_an_unreachable_database_is_waited_for_then_one_line(tmp_path: Path, data_dir: Path) -> None:
    dead_port = _dead_port()
    env = _env(tmp_path, data_dir, DATABASE_URL=f"postgresql+psycopg://u@127.0.0.1:{dead_port}/db", STARTUP_TIMEOUT="3")
    done = _cli("db", "upgrade", env=env, cwd=tmp_path)
    _one_line(done, "cannot reach the database", "STARTUP_TIMEOUT=3", "DATABASE_URL")
    assert done.stderr.count("waiting for the database") >= 2  # one line per attempt while it waited


@pytest.mark.postgres
def test_a_database_that_comes_up_20_seconds_late_is_waited_for(tmp_path: Path, data_dir: Path, pg_url: str) -> None:
    from sqlalchemy.engine import make_url

    real = make_url(pg_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)  # refuses connections until started
    late = real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    starter = threading.Timer(20.0, proxy.start)
    starter.start()
    started = time.monotonic()
    try:
        done = _cli(
            "db", "upgrade", env=_env(tmp_path, data_dir, DATABASE_URL=late, STARTUP_TIMEOUT="90"), cwd=tmp_path
        )
    finally:
        starter.cancel()
        proxy.stop()
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - started >= 19 and "database at revision 0002" in done.stdout
    assert "waiting for the database" in done.stderr


def _rabbit() -> str:
    from ..conftest import AMQP_URL, port_open, service_missing

    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    return AMQP_URL


@pytest.mark.rabbitmq
def test_an_unreachable_broker_is_waited_for_then_one_line(tmp_path: Path, data_dir: Path) -> None:
    _rabbit()
    dead_port = _dead_port()
    env = _env(tmp_path, data_dir, BROKER_URL=f"amqp://guest:guest@127.0.0.1:{dead_port}//", STARTUP_TIMEOUT="3")
    done = _cli("consume", env=env, cwd=tmp_path)
    _one_line(done, "cannot reach the broker", "STARTUP_TIMEOUT=3", "BROKER_URL")
    assert "waiting for the broker" in done.stderr


def test_publish_to_an_unreachable_broker_waits_like_the_other_commands_then_one_line(
    tmp_path: Path, data_dir: Path
) -> None:
    """It printed kombu's traceback after 13 s of retries that ignored STARTUP_TIMEOUT."""
    _rabbit()
    image = tmp_path / "a.jpg"
    image.write_bytes(b"not looked at before publishing")
    env = _env(tmp_path, data_dir, BROKER_URL=f"amqp://guest:guest@127.0.0.1:{_dead_port()}//", STARTUP_TIMEOUT="2")
    done = _cli("publish", str(image), env=env, cwd=tmp_path)
    _one_line(done, "cannot reach the broker", "STARTUP_TIMEOUT=2", "BROKER_URL")


@pytest.mark.rabbitmq
def test_a_broker_that_comes_up_20_seconds_late_is_waited_for_and_then_consumed(tmp_path: Path, data_dir: Path) -> None:
    import base64
    import signal
    import uuid

    from blip2_service.amqp_topology import Topology
    from blip2_service.publisher import QueuePublisher
    from blip2_service.store import CaptionFilter, CaptionRepository, make_engine

    from ..conftest import delete_topology, image_bytes, wait_until

    real = _rabbit()
    proxy = TcpProxy("127.0.0.1", 5672)
    name = f"blip2.test.{uuid.uuid4().hex[:8]}"
    env = _env(
        tmp_path,
        data_dir,
        BROKER_URL=f"amqp://guest:guest@127.0.0.1:{proxy.port}//",
        STARTUP_TIMEOUT="90",
        QUEUE_NAME=name,
        RESULTS_EXCHANGE=f"{name}.results",
    )
    starter = threading.Timer(20.0, proxy.start)
    starter.start()
    started = time.monotonic()
    worker = subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "consume"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    engine = make_engine(env["DATABASE_URL"])
    try:
        publisher = QueuePublisher(real, Topology(name, f"{name}.results"))
        publisher.publish({"id": "late", "image_b64": base64.b64encode(image_bytes(77)).decode()})
        publisher.close()

        def stored() -> bool:
            try:
                return bool(CaptionRepository(engine).query(CaptionFilter(source="queue"))[0])
            except Exception:
                return False

        wait_until(stored, 120, "the message to be captioned once the broker is reachable")
        assert time.monotonic() - started >= 19
    finally:
        starter.cancel()
        worker.send_signal(signal.SIGTERM)
        out, _ = worker.communicate(timeout=60)
        proxy.stop()
        engine.dispose()
        delete_topology(real, name)
    assert b"waiting for the broker" in out


@pytest.mark.rabbitmq
def test_serve_with_a_broker_that_stays_unreachable_exits_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    _rabbit()
    dead_port = _dead_port()
    env = _env(tmp_path, data_dir, BROKER_URL=f"amqp://guest:guest@127.0.0.1:{dead_port}//", STARTUP_TIMEOUT="2")
    _one_line(_cli("serve", env=env, cwd=tmp_path), "cannot reach the broker", "BROKER_URL")


@pytest.mark.rabbitmq
def test_consume_on_a_queue_declared_with_other_arguments_exits_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    """The consumer stops for good there; the process went on running, consuming nothing, and
    only its log said why."""
    import uuid

    from kombu import Connection

    from ..conftest import delete_topology

    url = _rabbit()
    name = f"blip2.cli.{uuid.uuid4().hex[:8]}"
    env = _env(tmp_path, data_dir, BROKER_URL=url, QUEUE_NAME=name, RESULTS_EXCHANGE=f"{name}.results")
    with Connection(url) as conn:
        conn.channel().queue_declare(name, durable=True, auto_delete=False)  # no dead-letter arguments
    try:
        done = _cli("consume", env=env, cwd=tmp_path, timeout=120)
        _one_line(done, "queue consumer stopped", "exists with other arguments", "QUEUE_NAME")
        assert done.returncode == 1
    finally:
        delete_topology(url, name)
