"""The repository on a real SQLite file and the real Postgres: same suite, same answers."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from alembic import command
from sqlalchemy import inspect, text, update
from sqlalchemy.engine import make_url

from blip2_service.domain import GenerationSettings, TransientError
from blip2_service.retry import Backoff
from blip2_service.store import (
    CaptionFilter,
    CaptionRepository,
    ImageInfo,
    NewCaption,
    Sighting,
    make_engine,
    upgrade,
)
from blip2_service.store.migrate import StoreSetupError, alembic_config, current_revision
from blip2_service.store.tables import captions

from ..conftest import service_missing
from ..tcp_proxy import TcpProxy

SETTINGS = GenerationSettings(num_beams=5, max_new_tokens=30)

CAPTIONS = [
    "a man riding a wave on top of a surfboard",
    "a dog running on the beach with a frisbee",
    "a plate of food with broccoli and rice",
    "two teddy bears sitting on a bed",
    "a red double decker bus driving down a street",
    "a cat sleeping on a couch next to a remote",
    "a man holding a surfboard on the beach",
    "a giraffe standing next to a tree",
]


def _new(
    i: int,
    text_: str,
    *,
    source: str = "http",
    ref: str | None = None,
    status: str = "succeeded",
    model: str = "m1",
    emoji: list[dict[str, str]] | None = None,
) -> NewCaption:
    sha = f"{i:064x}"
    return NewCaption(
        image=ImageInfo(sha, 1000 + i, 10, 10, "JPEG"),
        sighting=Sighting(source, ref or f"/photos/{i}.jpg"),
        model=model,
        settings=SETTINGS,
        status=status,
        texts=[text_] if status == "succeeded" else [],
        emoji_mappings=emoji or [],
        error=None if status == "succeeded" else "cannot be decoded",
        processing_time=0.1234,
    )


def _fill(store: CaptionRepository) -> list[int]:
    ids = []
    for i, caption in enumerate(CAPTIONS):
        words = [{"emoji": "🧸", "word": "teddy_bear"}] if "teddy" in caption else []
        source = "watch" if i % 2 else "http"
        item, _ = store.save(
            _new(
                i,
                caption,
                source=source,
                emoji=words,
                ref=f"/photos/{'beach' if 'beach' in caption else 'other'}/{i}.jpg",
            )
        )
        ids.append(item["id"])
    return ids


def test_migrations_create_the_schema_from_empty(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    upgrade(engine)  # idempotent
    assert current_revision(engine) == "0002"
    names = set(inspect(engine).get_table_names())
    assert {"images", "sightings", "captions", "alembic_version"} <= names
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            assert conn.execute(text("SELECT name FROM sqlite_master WHERE name='captions_fts'")).scalar()
            assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        else:
            cols = {c["name"] for c in inspect(engine).get_columns("captions")}
            assert "search" in cols
            assert conn.execute(text("SELECT indexname FROM pg_indexes WHERE indexname='ix_captions_search'")).scalar()
    engine.dispose()


def test_an_upgrade_indexes_the_emojis_of_captions_stored_before_it_and_a_downgrade_undoes_it(
    db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = make_engine(db_url)
    upgrade(engine, "0001")
    store = CaptionRepository(engine)
    saved, _ = store.save(_new(1, "a cat on a couch", emoji=[{"emoji": "🛋️", "word": "couch"}]))
    with engine.begin() as conn:  # as the code of revision 0001 wrote it: the mapped words alone
        conn.execute(update(captions).where(captions.c.id == saved["id"]).values(emoji_words="couch"))

    def by_emoji() -> list[int]:
        return [i["id"] for i in store.query(CaptionFilter(emojis=("🛋",)))[0]]

    assert by_emoji() == []
    with caplog.at_level(logging.INFO, logger="blip2_service.store.migrate"):
        upgrade(engine)
        upgrade(engine)  # nothing to do: no second line
    assert [r.getMessage().split(" in ")[0] for r in caplog.records] == [
        "database schema upgraded from revision 0001 to revision 0002"
    ]
    assert by_emoji() == [saved["id"]]
    assert [i["id"] for i in store.query(CaptionFilter(q="couch"))[0]] == [saved["id"]]
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes.update(connection=connection, schema="blip2")  # make_engine's default DB_SCHEMA
        command.downgrade(config, "0001")
    assert by_emoji() == []
    engine.dispose()


def test_a_database_migrated_by_a_newer_version_is_one_line_saying_so(db_url: str) -> None:
    engine = make_engine(db_url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(StoreSetupError, match="revision 0099, migrated by a newer blip2-service") as info:
        upgrade(engine)
    assert "\n" not in str(info.value)
    engine.dispose()


def test_saving_is_idempotent_and_records_each_sighting(store: CaptionRepository) -> None:
    first, created = store.save(_new(1, "a dog", ref="/a/1.jpg"))
    again, created_again = store.save(_new(1, "another text", ref="/b/1.jpg", source="queue"))
    assert created and not created_again
    assert again["id"] == first["id"] and again["text"] == "a dog"
    image = store.image(first["image_sha256"])
    assert image is not None
    assert [(loc["source"], loc["source_ref"]) for loc in image["locations"]] == [
        ("http", "/a/1.jpg"),
        ("queue", "/b/1.jpg"),
    ]
    assert len(image["captions"]) == 1
    # other model or settings: a second caption of the same image
    other, created_other = store.save(_new(1, "a dog", model="m2"))
    assert created_other and other["id"] != first["id"]


def test_a_failure_is_replaced_by_a_later_success(store: CaptionRepository) -> None:
    failed, _ = store.save(_new(2, "", status="failed"))
    assert failed["status"] == "failed" and failed["error"]
    ok, created = store.save(_new(2, "a cat"))
    assert not created and ok["id"] == failed["id"] and ok["status"] == "succeeded" and ok["text"] == "a cat"


def test_names_utf8_cannot_carry_are_stored_spelled_out_and_found_by_the_raw_name(store: CaptionRepository) -> None:
    # A Linux file name that is not UTF-8 (os.fsdecode gives surrogate escapes), a lone surrogate
    # from a JSON message id, and a NUL: neither engine can take them as they are.
    raw = "/inbox/\udcff\udcfe.jpg"
    failed = dataclasses.replace(_new(3, "", status="failed"), error=f"File not found: {raw}")
    failed = dataclasses.replace(failed, sighting=Sighting("watch", raw, 10, 1.5))
    item, _ = store.save(failed)
    assert item["source_ref"] == r"/inbox/\xff\xfe.jpg"
    assert item["error"] == r"File not found: /inbox/\xff\xfe.jpg"
    message, _ = store.save(_new(4, "a dog", source="queue", ref="message:id-\ud800-\x00"))
    assert message["source_ref"] == r"message:id-\ud800-\x00"
    # The watcher looks up, and marks gone, by the raw name it has from the file system.
    assert store.known_files(None, "/inbox/") == {r"/inbox/\xff\xfe.jpg": (10, 1.5)}
    assert store.mark_gone("watch", raw) == 1
    assert store.known_files(None, "/inbox/") == {}


def test_filters_and_paging(store: CaptionRepository) -> None:
    ids = _fill(store)
    store.save(_new(50, "", status="failed", model="m2"))
    items, cursor = store.query(CaptionFilter(), limit=3)
    assert [i["id"] for i in items] == sorted([*ids, items[0]["id"]], reverse=True)[:3]
    assert cursor is not None
    seen = [i["id"] for i in items]
    while cursor:
        page, cursor = store.query(CaptionFilter(), limit=3, cursor=cursor)
        seen += [i["id"] for i in page]
    assert len(seen) == len(set(seen)) == 9
    assert {i["source"] for i in store.query(CaptionFilter(source="watch"))[0]} == {"watch"}
    assert [i["status"] for i in store.query(CaptionFilter(status="failed"))[0]] == ["failed"]
    assert {i["model"] for i in store.query(CaptionFilter(model="m2"))[0]} == {"m2"}
    beach = store.query(CaptionFilter(path="/photos/beach/"))[0]
    assert sorted(i["text"] for i in beach) == sorted(c for c in CAPTIONS if "beach" in c)
    now = datetime.now(UTC)
    assert len(store.query(CaptionFilter(since=now - timedelta(minutes=5)))[0]) == 9
    assert store.query(CaptionFilter(since=now + timedelta(minutes=5)))[0] == []
    assert len(store.query(CaptionFilter(until=now + timedelta(minutes=5)))[0]) == 9


def test_paging_is_stable_under_concurrent_inserts(store: CaptionRepository) -> None:
    _fill(store)
    first, cursor = store.query(CaptionFilter(), limit=4)
    for i in range(100, 110):  # newer rows arrive while a client pages
        store.save(_new(i, f"new caption {i}"))
    rest, _ = store.query(CaptionFilter(), limit=50, cursor=cursor)
    ids = [i["id"] for i in first + rest]
    assert len(ids) == len(set(ids)) == len(CAPTIONS)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("beach", {1, 6}),
        ("surfboard beach", {6}),
        ("teddy", {3}),
        ("teddy_bear", {3}),
        ("SURF", {0, 6}),  # last word is a prefix, case does not matter
        ("giraffe tree", {7}),
        ("zebra", set()),
        ("a dog's, on the beach!", {1}),
    ],
)
def test_full_text_search(store: CaptionRepository, query: str, expected: set[int]) -> None:
    ids = _fill(store)
    found = {ids.index(i["id"]) for i in store.query(CaptionFilter(q=query))[0]}
    assert found == expected


def test_emojis_are_found_in_the_mappings_with_or_without_variation_selectors(store: CaptionRepository) -> None:
    ids = []
    for i, emojis in enumerate([["🛋️", "🐈"], ["🐈"], ["🐕", "🏖️"], []]):
        mappings = [{"emoji": e, "word": f"w{n}"} for n, e in enumerate(emojis)]
        ids.append(store.save(_new(i, f"caption {i} on the beach", emoji=mappings))[0]["id"])

    def found(**filters: object) -> set[int]:
        return {ids.index(item["id"]) for item in store.query(CaptionFilter(**filters))[0]}  # type: ignore[arg-type]

    assert found(emojis=("🐈",)) == {0, 1}
    assert found(emojis=("🛋",)) == {0}  # stored as 🛋️ (with U+FE0F)
    assert found(emojis=("🐈", "🛋")) == {0}  # every emoji must be there
    assert found(emojis=("🏖",), q="beach") == {2}
    assert found(emojis=("🦄",)) == set()


def test_both_engines_find_the_same_ids(sqlite_url: str, pg_url: str) -> None:
    stores = []
    for url in (sqlite_url, pg_url):
        engine = make_engine(url)
        upgrade(engine)
        stores.append(CaptionRepository(engine))
        _fill(stores[-1])
    for q in ("beach", "man", "on the", "bear", "teddy bears bed", "driving str", "remote", "xyz"):
        results = [[i["id"] for i in s.query(CaptionFilter(q=q))[0]] for s in stores]
        assert results[0] == results[1], q
    for s in stores:
        s.engine.dispose()


def _store_through_proxy(pg_url: str, retry: Backoff) -> tuple[TcpProxy, CaptionRepository]:
    """A migrated store that reaches Postgres through a started TCP proxy the test can cut."""
    real = make_url(pg_url)
    proxy = TcpProxy(real.host or "127.0.0.1", real.port or 5432)
    proxy.start()
    engine = make_engine(real.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False))
    upgrade(engine)
    return proxy, CaptionRepository(engine, retry)


def test_a_database_that_is_down_is_a_transient_error_then_recovers(pg_url: str) -> None:
    proxy, store = _store_through_proxy(pg_url, Backoff(0.05, 3.0, 3))
    store.save(_new(1, "before the outage"))
    proxy.stop()
    with pytest.raises(TransientError, match="The store is unavailable"):
        store.save(_new(2, "during the outage"))
    # back within the retry window: the write goes through
    store.retry = Backoff(0.2, 0.5, 20)
    threading.Timer(1.0, proxy.start).start()
    started = time.monotonic()
    item, created = store.save(_new(3, "after the outage"))
    assert created and item["text"] == "after the outage"
    assert time.monotonic() - started >= 0.5
    assert store.count() == 2
    proxy.stop()
    store.engine.dispose()


@contextmanager
def _blackholed(port: int) -> Iterator[None]:
    """Drop every packet to and from `port` (iptables), as a network partition or a frozen host
    does: no reset, no refusal, just silence."""
    rules = [
        ["INPUT", "-p", "tcp", "--dport", str(port), "-j", "DROP"],
        ["INPUT", "-p", "tcp", "--sport", str(port), "-j", "DROP"],
    ]
    added = []
    try:
        for rule in rules:
            done = subprocess.run(["iptables", "-I", *rule], capture_output=True, check=False)
            if done.returncode != 0:
                service_missing("iptables (root) to drop packets", done.stderr.decode().strip() or "not permitted")
            added.append(rule)
        yield
    finally:
        for rule in added:
            subprocess.run(["iptables", "-D", *rule], check=False)


def test_a_database_host_that_goes_silent_is_a_transient_error_not_a_hang_then_recovers(pg_url: str) -> None:
    """A pooled connection to a host that vanished without closing it waited ~15 minutes on the
    kernel's retransmissions, and every request, health check and watched file behind it."""
    if shutil.which("iptables") is None:
        service_missing("iptables (root) to drop packets", "not installed")
    proxy, store = _store_through_proxy(pg_url, Backoff(0.1, 0.1, 2))
    store.save(_new(1, "before the partition"))
    outcome: list[BaseException | None] = []

    def save() -> None:
        try:
            store.save(_new(2, "during the partition"))
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    try:
        with _blackholed(proxy.port):
            writer = threading.Thread(target=save, daemon=True)
            writer.start()
            writer.join(120)  # tcp_user_timeout 10 s, then a 5 s connect timeout per try
            assert not writer.is_alive(), "the save still waits on a silent database"
        assert isinstance(outcome[0], TransientError), outcome
        item, created = store.save(_new(3, "after the partition"))  # a fresh connection, at once
        assert created and item["text"] == "after the partition"
    finally:
        proxy.stop()
        store.engine.dispose()
