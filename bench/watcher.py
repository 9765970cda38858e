"""Watched-folder speed with the real tiny-random model and SQLite:

1. end to end: 1,000 small images copied into the folder at once -> all stored (files/s);
2. catch-up: start over 10,000 files that are already stored (time until the scan is done).

Finishes in about 3 minutes here:  .venv/bin/python bench/watcher.py [--files 1000] [--stored 10000]
"""

from __future__ import annotations

import argparse
import io
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import func, insert, select

from blip2_service.domain import GenerationSettings
from blip2_service.pipeline import CaptionPipeline, PipelineLimits
from blip2_service.store import CaptionRepository, make_engine, upgrade
from blip2_service.store.tables import captions, images, sightings
from blip2_service.watcher import FolderWatcher
from tiny_setup import tiny_model_and_mapper

SETTINGS = GenerationSettings(num_beams=1, max_new_tokens=8)


def small_jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def count(store: CaptionRepository) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(captions)).scalar_one())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--stored", type=int, default=10_000)
    parser.add_argument("--polling", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        holder, mapper = tiny_model_and_mapper(tmp)

        # 1. end to end
        engine = make_engine(f"sqlite:///{tmp / 'e2e.db'}")
        upgrade(engine)
        store = CaptionRepository(engine)
        pipeline = CaptionPipeline(
            holder=holder, mapper=mapper, store=store, limits=PipelineLimits(batch_max_size=16, max_pending=256)
        )
        pipeline.start()
        staging = tmp / "staging"
        staging.mkdir()
        for i in range(args.files):
            (staging / f"{i:05d}.jpg").write_bytes(small_jpeg(i))
        inbox = tmp / "inbox"
        watcher = FolderWatcher(
            [inbox], pipeline=pipeline, store=store, generation=SETTINGS, settle_seconds=0.5, polling=args.polling
        )
        watcher.start()
        watcher.catch_up_done.wait(30)
        t0 = time.perf_counter()
        shutil.copytree(staging, inbox / "drop")
        while count(store) < args.files:
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
        watcher.stop()
        pipeline.stop()
        print(
            f"end to end: {args.files} files copied -> stored in {elapsed:.1f}s = {args.files / elapsed:.1f} files/s "
            f"(settle 0.5 s, {'polling' if args.polling else 'inotify'}, tiny-random, SQLite)",
            flush=True,
        )

        # 2. catch-up over already-stored files
        folder = tmp / "archive"
        folder.mkdir()
        data = small_jpeg(0)
        now = datetime.now(UTC)
        rows_img, rows_seen, rows_cap = [], [], []
        for i in range(args.stored):
            sub = folder / f"{i // 1000:02d}"
            sub.mkdir(exist_ok=True)
            path = sub / f"{i:06d}.jpg"
            path.write_bytes(data)
            st = path.stat()
            sha = f"{i:064x}"
            rows_img.append({"sha256": sha, "byte_size": st.st_size, "created_at": now})
            rows_seen.append(
                {
                    "image_sha256": sha,
                    "source": "watch",
                    "source_ref": str(path),
                    "file_size": st.st_size,
                    "file_mtime": st.st_mtime,
                    "first_seen_at": now,
                    "last_seen_at": now,
                }
            )
            rows_cap.append(
                {
                    "image_sha256": sha,
                    "model": "tiny-random",
                    "settings_key": SETTINGS.key(),
                    "settings": SETTINGS.as_dict(),
                    "status": "succeeded",
                    "text": "x",
                    "texts": ["x"],
                    "emoji_mappings": [],
                    "emoji_words": "",
                    "error": None,
                    "processing_time": 0.1,
                    "source": "watch",
                    "source_ref": str(path),
                    "created_at": now,
                }
            )
        engine2 = make_engine(f"sqlite:///{tmp / 'catchup.db'}")
        upgrade(engine2)
        with engine2.begin() as conn:
            conn.execute(insert(images), rows_img)
            conn.execute(insert(sightings), rows_seen)
            conn.execute(insert(captions), rows_cap)
        store2 = CaptionRepository(engine2)
        pipeline2 = CaptionPipeline(holder=holder, mapper=mapper, store=store2, limits=PipelineLimits())
        pipeline2.start()
        watcher2 = FolderWatcher([folder], pipeline=pipeline2, store=store2, generation=SETTINGS, polling=args.polling)
        t0 = time.perf_counter()
        watcher2.start()
        watcher2.catch_up_done.wait(600)
        elapsed = time.perf_counter() - t0
        watcher2.stop()
        pipeline2.stop()
        print(
            f"catch-up: {args.stored} stored files checked in {elapsed:.2f}s, {watcher2.stats.catch_up_queued} queued "
            f"(recognised by path, size and mtime; no file read)",
            flush=True,
        )


if __name__ == "__main__":
    main()
