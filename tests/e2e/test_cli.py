"""The command line as a user runs it: real processes, real files, real services."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from PIL import Image
from sqlalchemy import func, select

from blip2_service.imaging import heif_support
from blip2_service.store import CaptionFilter, CaptionRepository, make_engine, upgrade
from blip2_service.store.tables import captions

from ..conftest import AMQP_URL, delete_topology, image_bytes, port_open, service_missing


def _env(tmp_path: Path, data_dir: Path, **extra: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL", "WATCH", "BROKER", "DATABASE"))}
    return {
        **base,
        "MODEL": "tiny-random",
        "DTYPE": "float32",
        "NUM_BEAMS": "1",
        "MAX_NEW_TOKENS": "6",
        "DATA_DIR": str(data_dir),
        "DATABASE_URL": f"sqlite:///{tmp_path / 'cli.db'}",
        "AUTO_UPDATE": "false",
        **extra,
    }


def _cli(*args: str, env: dict[str, str], cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "blip2_service.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _count(url: str) -> int:
    engine = make_engine(url)
    upgrade(engine)
    with engine.connect() as conn:
        n = int(conn.execute(select(func.count()).select_from(captions)).scalar_one())
    engine.dispose()
    return n


def test_caption_prints_json_lines_and_stores(tmp_path: Path, data_dir: Path) -> None:
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "a.jpg").write_bytes(image_bytes(1))
    (photos / "sub" / "b.png").write_bytes(image_bytes(2, fmt="PNG"))
    (photos / "broken.jpg").write_bytes(image_bytes(3, size=(200, 200))[:1500])
    (photos / "notes.txt").write_text("ignored: not an image name")
    env = _env(tmp_path, data_dir)
    result = _cli("caption", str(photos), env=env, cwd=tmp_path)
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(line["path"]).name for line in lines] == ["a.jpg", "broken.jpg", "b.png"]
    by_name = {Path(line["path"]).name: line for line in lines}
    assert by_name["a.jpg"]["status"] == "succeeded" and by_name["a.jpg"]["text"]
    assert by_name["broken.jpg"]["status"] == "failed" and "decoded" in by_name["broken.jpg"]["error"]
    assert result.returncode == 1  # one image failed
    assert _count(env["DATABASE_URL"]) == 3
    # stderr says what the folder held besides images, and how it went
    assert "skipped, not images by their names: 1 .txt" in result.stderr
    assert result.stderr.rstrip().endswith("caption: 2 succeeded (0 already stored), 1 failed")
    again = _cli("caption", str(photos / "a.jpg"), env=env, cwd=tmp_path)
    assert again.returncode == 0 and json.loads(again.stdout)["cached"] is True
    assert again.stderr.rstrip().endswith("caption: 1 succeeded (1 already stored), 0 failed")
    # An unreadable path is reported in its place among the others, not as soon as it is read.
    mixed = _cli(
        "caption", str(photos / "a.jpg"), str(photos / "gone.jpg"), str(photos / "sub" / "b.png"), env=env, cwd=tmp_path
    )
    lines = [json.loads(line) for line in mixed.stdout.splitlines()]
    assert [(Path(x["path"]).name, x["status"]) for x in lines] == [
        ("a.jpg", "succeeded"),
        ("gone.jpg", "failed"),
        ("b.png", "succeeded"),
    ]
    assert mixed.returncode == 1
    # A file name that is not UTF-8: captioned, stored and printed as Python spells the name.
    odd = os.path.join(os.fsencode(photos), b"\xffc.jpg")
    Path(os.fsdecode(odd)).write_bytes(image_bytes(4))
    command = [sys.executable.encode(), b"-m", b"blip2_service.cli", b"caption", odd]
    named = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True)
    assert named.returncode == 0, named.stderr[-2000:]
    assert json.loads(named.stdout)["path"] == f"{photos}/\\xffc.jpg"
    assert json.loads(named.stdout)["status"] == "succeeded"


def test_without_the_heif_extra_a_heic_is_said_at_start_and_recorded_as_failed_with_what_to_do(
    tmp_path: Path, data_dir: Path
) -> None:
    blocked = tmp_path / "no-heif"
    blocked.mkdir()
    (blocked / "pillow_heif.py").write_text("raise ImportError('the heif extra is not installed')\n")
    photo = tmp_path / "IMG_0001.HEIC"
    heif_support()  # registers the encoder here, in the test's process
    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo, format="HEIF")
    env = _env(tmp_path, data_dir, PYTHONPATH=f"{blocked}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    result = _cli("caption", str(photo), env=env, cwd=tmp_path)
    assert result.returncode == 1
    assert "HEIC/HEIF photos will be refused: pillow-heif is not installed" in result.stderr
    line = json.loads(result.stdout)
    assert line["status"] == "failed" and "pip install pillow-heif" in line["error"]


def test_db_upgrade_and_help(tmp_path: Path, data_dir: Path) -> None:
    env = _env(tmp_path, data_dir)
    result = _cli("db", "upgrade", env=env, cwd=tmp_path)
    assert result.returncode == 0 and "revision 0002" in result.stdout
    for command in ("serve", "watch", "consume", "caption", "publish", "db", "emoji"):
        shown = _cli(command, "--help", env=env, cwd=tmp_path)
        assert shown.returncode == 0 and "usage: blip2-service" in shown.stdout


def test_watch_runs_alone_and_stops_cleanly_on_sigterm(tmp_path: Path, data_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "before.jpg").write_bytes(image_bytes(5))
    env = _env(tmp_path, data_dir, WATCH_SETTLE_SECONDS="0.3")
    proc = subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "watch", str(inbox)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 120
        while _count(env["DATABASE_URL"]) < 1 and time.monotonic() < deadline:
            time.sleep(0.3)
        (inbox / "after.jpg").write_bytes(image_bytes(6))
        while _count(env["DATABASE_URL"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert _count(env["DATABASE_URL"]) == 2
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out.decode()


def test_publish_embed_wait_through_a_consumer(tmp_path: Path, data_dir: Path) -> None:
    if not port_open("127.0.0.1", 5672):
        service_missing("RabbitMQ", AMQP_URL)
    name = f"blip2.cli.{uuid.uuid4().hex[:8]}"
    env = _env(tmp_path, data_dir, BROKER_URL=AMQP_URL, QUEUE_NAME=name, RESULTS_EXCHANGE=f"{name}.results")
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"{i}.jpg").write_bytes(image_bytes(70 + i))
    consumer = subprocess.Popen(
        [sys.executable, "-m", "blip2_service.cli", "consume"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        result = _cli("publish", "--embed", "--wait", "--timeout", "120", str(photos), env=env, cwd=tmp_path)
    finally:
        consumer.send_signal(signal.SIGTERM)
        consumer.communicate(timeout=60)
        delete_topology(AMQP_URL, name)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert sorted(Path(line["path"]).name for line in lines) == ["0.jpg", "1.jpg", "2.jpg"]
    assert all(line["status"] == "success" and line["predictions"][0]["text"] for line in lines)
    assert _count(env["DATABASE_URL"]) == 3
    assert consumer.returncode == 0
    repo = CaptionRepository(make_engine(env["DATABASE_URL"]))
    assert {item["source"] for item in repo.query(CaptionFilter())[0]} == {"queue"}
