"""The API description holds: it validates as OpenAPI 3.1, and schemathesis fuzzes every route
of the real server against it (all checks, a fixed seed, a bounded number of examples, then the
stateful phase that follows the links from a caption to /captions/{id} and /images/{sha256})."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from openapi_spec_validator import validate

from ..conftest import image_bytes
from .test_serve_process import _start, _stop, _wait_for

CONFIG = Path(__file__).with_name("schemathesis.toml")


def test_schemathesis_finds_no_failure_and_the_description_is_openapi_3_1(tmp_path: Path, data_dir: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "a.jpg").write_bytes(image_bytes(5))
    proc, port = _start(
        tmp_path,
        data_dir,
        MODEL="tiny-random",
        FILE_ROOTS=str(inbox),
        NUM_BEAMS="1",
        MAX_NEW_TOKENS="4",
        URL_TIMEOUT="1",  # fuzzed URLs point nowhere: fail fast
        LOG_LEVEL="INFO",
    )
    try:
        _wait_for(port, {"loaded"})
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/openapi.json", timeout=10) as resp:
            document = json.loads(resp.read())
        validate(document)  # raises on anything that is not valid OpenAPI 3.1
        assert document["openapi"].startswith("3.1")
        run = subprocess.run(
            [
                str(Path(sys.executable).with_name("st")),
                "--config-file",
                str(CONFIG),
                "run",
                f"http://127.0.0.1:{port}/openapi.json",
                "--checks",
                "all",
                "--seed",
                "20261128",
                "--max-examples",
                "30",
                "--workers",
                "2",
                "--phases",
                "examples,fuzzing,stateful",
                "--no-color",
            ],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        summary = run.stdout[-6000:]
        assert run.returncode == 0, summary
        assert "Stateful" in summary and "passed" in summary
    finally:
        code, log = _stop(proc)
    assert code == 0
    assert "Traceback" not in log, log[-4000:]  # no unhandled error, and malformed requests log one line
    assert "rejected a malformed HTTP request" in log  # schemathesis sends a NUL-byte header probe
