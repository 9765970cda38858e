"""What the GPU benchmark reads back from py-spy: a parse error there lost the whole row of a
lent GPU's run (bench/gpu_serve.py), so it is checked here on py-spy's real output format."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

from gpu_serve import gil_samples_by_thread

# As `py-spy record --gil --threads -f raw` wrote it for the server on 2026-12-01: SQLAlchemy's
# compiled statements appear as frames named by their SQL text, newlines and all.
RAW = """thread (12852): decode_0;Thread.run (threading.py:982);_worker (concurrent/futures/thread.py:83) 2
thread (12853): decode_1;Thread.run (threading.py:982);decode_image (blip2_service/imaging.py:90) 5
thread (13248): finish_1;Thread.run (threading.py:982);INSERT INTO images (sha256, width) VALUES (?, ?)
ON CONFLICT (sha256) DO UPDATE SET width = excluded.width
FROM captions (<string>:1) 3
thread (12843): MainThread;_run_module_as_main (<frozen runpy>:198) 7
"""


def test_records_whose_frames_run_over_lines_are_counted_with_their_thread() -> None:
    groups, unread = gil_samples_by_thread(RAW)
    assert groups == {"decode": 7, "finish": 3, "MainThread": 7}
    assert unread == 0


def test_a_record_without_a_count_is_reported_not_fatal() -> None:
    groups, unread = gil_samples_by_thread(RAW + "thread (1): cut off mid-write;frame")
    assert groups["MainThread"] == 7 and unread == 1
