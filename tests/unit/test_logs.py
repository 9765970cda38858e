import json
import logging

import pytest

from blip2_service.logs import setup_logging


def test_json_log_format_is_one_object_a_line(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    try:
        logging.getLogger("blip2_service.test").info("hello %s", "world")
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("blip2_service.test").exception("failed")
        lines = capsys.readouterr().err.strip().splitlines()
        first, second = json.loads(lines[0]), json.loads(lines[1])
        assert first["message"] == "hello world" and first["level"] == "INFO"
        assert first["logger"] == "blip2_service.test" and first["time"].endswith("Z")
        assert second["level"] == "ERROR" and "ValueError: boom" in second["exception"]
        assert len(lines) == 2  # the traceback stays inside its line
        logging.getLogger("blip2_service.test").info("skipping %s", "/in/\udcff.jpg")  # a non-UTF-8 file name
        line = capsys.readouterr().err.strip()
        line.encode("utf-8")  # a valid line for any log shipper
        assert json.loads(line)["message"] == r"skipping /in/\xff.jpg"
    finally:
        setup_logging("WARNING", "text")
