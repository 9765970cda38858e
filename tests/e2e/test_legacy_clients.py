"""The legacy service's real clients, as they call it, against `blip2-service serve` as a process.

Client code written here from what the two public clients do (not copied):
- windmill's BLIP worker (`workers/blip_worker.py` on `workers/base_worker.py`): a multipart POST,
  field `file`, filename `image.jpg`, to `/analyze`, 30 s timeout, no retries; it keeps any HTTP
  answer as final and reads `status`, `predictions[0].text`, `predictions[0].emoji_mappings[]`
  (`emoji`, `word`), `metadata.processing_time`, and `error.message` on errors.
- the api's Node client (`services/V3BaseMLService.js`): `GET /v3/analyze?file=<its upload
  folder>/<name>` or `?url=http://localhost:<port>/<name>`, 30 s timeout.
Plus the legacy `/v2` forms and the seed document's examples.

The server starts with the model still loading when the first call goes out: windmill's first
request must be answered 200 once the model is ready, never 503.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..conftest import image_bytes
from .test_serve_process import _start, _stop, _wait_for

TIMEOUT = 30  # both clients' request timeout


def windmill_post(base: str, image: bytes) -> tuple[int, dict[str, Any]]:
    """windmill's call: multipart field `file` named image.jpg, POST /analyze, one try."""
    boundary = "windmill-boundary-7f3a"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="image.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    request = urllib.request.Request(
        base + "/analyze",
        data=body,
        method="POST",
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
    )
    return _send(request)


def api_get(base: str, **params: str) -> tuple[int, dict[str, Any]]:
    """The api's call: GET /v3/analyze with ?file= or ?url=."""
    return _send(urllib.request.Request(base + "/v3/analyze?" + urllib.parse.urlencode(params)))


def _send(request: urllib.request.Request) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def read_like_the_clients(status: int, body: dict[str, Any]) -> dict[str, Any]:
    """Every field the two clients read, read the way they read it."""
    if status != 200:
        return {"status": body["status"], "error": body["error"]["message"]}
    prediction = body["predictions"][0]
    return {
        "status": body["status"],
        "text": prediction["text"],
        "emojis": [(m["emoji"], m["word"]) for m in prediction["emoji_mappings"]],
        "processing_time": float(body["metadata"]["processing_time"]),
    }


@pytest.fixture
def image_host(tmp_path: Path) -> Iterator[str]:
    """The api serves its uploads at http://localhost:<port>/<name>."""
    folder = tmp_path / "served"
    folder.mkdir()
    (folder / "cat.jpg").write_bytes(image_bytes(61))
    handler = lambda *a: http.server.SimpleHTTPRequestHandler(*a, directory=str(folder))  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()


def test_the_legacy_clients_calls_work_unchanged(tmp_path: Path, data_dir: Path, image_host: str) -> None:
    uploads = tmp_path / "uploads"  # the folder the api shares with this service
    uploads.mkdir()
    (uploads / "dog.jpg").write_bytes(image_bytes(62))
    proc, port = _start(
        tmp_path,
        data_dir,
        MODEL="tiny-random",
        FILE_ROOTS=str(uploads),
        URL_ALLOW_NETWORKS="127.0.0.1/32,::1/128",
        NUM_BEAMS="1",
        MAX_NEW_TOKENS="6",
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # windmill's first request goes out while the model is still loading: it must wait, not 503.
        for _ in range(300):
            try:
                first = windmill_post(base, image_bytes(63))
                break
            except (urllib.error.URLError, ConnectionError):  # not listening yet: windmill retries these
                time.sleep(0.1)
        else:
            raise AssertionError("the service never accepted a connection")
        read = read_like_the_clients(*first)
        assert first[0] == 200 and read["status"] == "success" and read["text"], first
        assert all(emoji and word for emoji, word in read["emojis"]) and read["processing_time"] >= 0

        status, body = api_get(base, file=str(uploads / "dog.jpg"))
        assert status == 200 and read_like_the_clients(status, body)["text"]
        status, body = api_get(base, url=f"{image_host}/cat.jpg")
        assert status == 200 and read_like_the_clients(status, body)["text"]

        # the legacy names and the seed document's examples
        for path, params in (
            ("/v2/analyze", {"image_url": f"{image_host}/cat.jpg"}),
            ("/v2/analyze_file", {"file_path": str(uploads / "dog.jpg")}),
            ("/analyze", {"url": f"{image_host}/cat.jpg"}),
            ("/analyze", {"file": str(uploads / "dog.jpg")}),
        ):
            status, body = _send(urllib.request.Request(base + path + "?" + urllib.parse.urlencode(params)))
            assert status == 200 and body["service"] == "blip2" and body["predictions"][0]["text"], (path, body)

        # errors in the shape they read, with a message that says what to do
        status, body = api_get(base, file="/etc/passwd")
        assert status == 403 and "FILE_ROOTS" in read_like_the_clients(status, body)["error"]
        status, body = api_get(base)
        assert status == 400 and read_like_the_clients(status, body)["error"]
        with urllib.request.urlopen(base + "/health", timeout=TIMEOUT) as resp:
            health = json.loads(resp.read())
        assert health["status"] == "healthy" and health["model_status"] == "loaded"
    finally:
        code, out = _stop(proc)
    assert code == 0, out


def test_listen_after_load_accepts_no_connection_until_the_model_is_ready(tmp_path: Path, data_dir: Path) -> None:
    proc, port = _start(tmp_path, data_dir, MODEL="tiny-random", LISTEN_AFTER_LOAD="true", NUM_BEAMS="1")
    try:
        health = _wait_for(port, {"loaded"}, timeout=120)
        assert health["status"] == "healthy"  # the first answer it ever gave
    finally:
        code, out = _stop(proc)
    assert code == 0, out
    assert "waiting for the model before listening" in out
    assert out.index("waiting for the model before listening") < out.index("listening on")


def test_listen_after_load_with_a_model_that_cannot_load_exits_with_one_line(tmp_path: Path, data_dir: Path) -> None:
    proc, _port = _start(
        tmp_path, data_dir, MODEL=str(tmp_path / "no-such-model"), LISTEN_AFTER_LOAD="true", MODEL_DOWNLOAD="false"
    )
    out, _ = proc.communicate(timeout=120)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "Traceback" not in text and "blip2-service: Cannot load" in text
