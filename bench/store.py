"""Store speed on SQLite and Postgres: caption inserts per second, and /captions?q= latency at 100k rows
(words and emojis alike through the full-text index), and the schema upgrade over those rows.

Inserts go through `CaptionRepository.save` (the real path: image, sighting and caption upserts in one
transaction) from 4 threads for a sample; the table is then filled to --rows with bulk inserts, and
the upgrade from the first schema revision is timed over those rows, and GET /captions?q=… is
timed over real HTTP for a few queries. Finishes in about 5 minutes here:
  .venv/bin/python bench/store.py [--rows 100000] [--postgres postgresql+psycopg://postgres@127.0.0.1/test]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, insert, text
from sqlalchemy.engine import make_url

from blip2_service.domain import GenerationSettings
from blip2_service.emoji import EmojiMapper, load_bundled
from blip2_service.store import CaptionRepository, ImageInfo, NewCaption, Sighting, make_engine, upgrade
from blip2_service.store.repository import search_words
from blip2_service.store.tables import captions, images

WORDS = [
    "man",
    "woman",
    "dog",
    "cat",
    "surfboard",
    "wave",
    "beach",
    "pizza",
    "plate",
    "table",
    "bus",
    "street",
    "giraffe",
    "tree",
    "field",
    "train",
    "tracks",
    "kite",
    "sky",
    "horse",
    "elephant",
    "grass",
    "boy",
    "girl",
    "frisbee",
    "park",
    "bed",
    "teddy",
    "bear",
    "umbrella",
    "rain",
    "bench",
    "laptop",
]
SETTINGS = GenerationSettings()
_TABLE = load_bundled()
MAPPER = EmojiMapper(_TABLE.table, _TABLE.stopwords)


def mappings(text_: str) -> list[dict[str, str]]:
    return [m.as_dict() for m in MAPPER.map(text_)]


def caption_text(rng: random.Random) -> str:
    return "a " + " ".join(rng.choice(WORDS) for _ in range(7))


def new_caption(i: int, rng: random.Random) -> NewCaption:
    text_ = caption_text(rng)
    return NewCaption(
        ImageInfo(f"{i:064x}", 1000),
        Sighting("watch", f"/photos/{i}.jpg"),
        "m",
        SETTINGS,
        "succeeded",
        [text_],
        mappings(text_),
        None,
        0.1,
    )


def bulk_fill(repo: CaptionRepository, start: int, rows: int) -> None:
    rng = random.Random(start)
    now = datetime.now(UTC)
    chunk = 5000
    with repo.engine.begin() as conn:
        for base in range(start, rows, chunk):
            ids = range(base, min(base + chunk, rows))
            conn.execute(insert(images), [{"sha256": f"{i:064x}", "byte_size": 1000, "created_at": now} for i in ids])
            rows_ = []
            for i in ids:
                t = caption_text(rng)
                mapped = mappings(t)
                rows_.append(
                    {
                        "image_sha256": f"{i:064x}",
                        "model": "m",
                        "settings_key": SETTINGS.key(),
                        "settings": SETTINGS.as_dict(),
                        "status": "succeeded",
                        "text": t,
                        "texts": [t],
                        "emoji_mappings": mapped,
                        "emoji_words": search_words(mapped),
                        "error": None,
                        "processing_time": 0.1,
                        "source": "watch",
                        "source_ref": f"/photos/{i}.jpg",
                        "created_at": now,
                    }
                )
            conn.execute(insert(captions), rows_)


async def time_queries(repo: CaptionRepository, queries: list[str], repeat: int = 20) -> dict[str, float]:
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from blip2_service.http_api.results import add_routes

    class _Ctx:
        store = repo
        mapper = MAPPER

    from blip2_service.http_api.context import CONTEXT

    app = web.Application()
    app[CONTEXT] = _Ctx()  # type: ignore[assignment]  (the /captions routes read .store, .mapper)
    add_routes(app)
    out = {}
    async with TestClient(TestServer(app)) as client:
        for q in queries:
            timings = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                resp = await client.get("/captions", params={"q": q, "limit": "50"})
                body: Any = await resp.json()
                timings.append(time.perf_counter() - t0)
                assert resp.status == 200 and "items" in body
            out[q] = statistics.median(timings)
    return out


def bench(name: str, url: str, rows: int, sample: int) -> None:
    engine = make_engine(url)
    upgrade(engine, "0001")  # filled at the first revision, so the step to the latest is timed over the rows
    repo = CaptionRepository(engine)
    rng = random.Random(1)
    items = [new_caption(i, rng) for i in range(sample)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(repo.save, items))
    rate = sample / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    bulk_fill(repo, sample, rows)
    fill = time.perf_counter() - t0
    t0 = time.perf_counter()
    upgrade(engine)
    migrate = time.perf_counter() - t0
    if engine.dialect.name == "postgresql":
        with engine.begin() as conn:
            conn.execute(text("ANALYZE"))
    queries = ["dog", "surfboard wave", "giraffe tree field", "bea", "zebra", "🐕", "🦒 tree", "🦓"]
    latencies = asyncio.run(time_queries(repo, queries))
    print(
        f"{name:9s} save(): {rate:7.0f} captions/s (4 threads, {sample} rows); filled to {repo.count()} rows "
        f"in {fill:.0f}s; upgrade from revision 0001 over them {migrate:.1f}s",
        flush=True,
    )
    for q, seconds in latencies.items():
        print(f"{'':9s} GET /captions?q={q!r:22s} median {1000 * seconds:7.1f} ms", flush=True)
    engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--sample", type=int, default=3000, help="rows inserted through save()")
    parser.add_argument("--postgres", default="postgresql+psycopg://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bench("sqlite", f"sqlite:///{Path(tmp) / 'bench.db'}", args.rows, args.sample)
    admin = create_engine(args.postgres, isolation_level="AUTOCOMMIT")
    db = f"blip2_bench_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db}"'))
    try:
        bench(
            "postgres",
            make_url(args.postgres).set(database=db).render_as_string(hide_password=False),
            args.rows,
            args.sample,
        )
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))


if __name__ == "__main__":
    main()
