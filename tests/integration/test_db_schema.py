"""A database shared with other applications (DB_SCHEMA), on the real Postgres."""

from __future__ import annotations

import subprocess
import sys

import pytest
from sqlalchemy import create_engine, text

from blip2_service.domain import GenerationSettings
from blip2_service.store import CaptionFilter, CaptionRepository, ImageInfo, NewCaption, Sighting, make_engine, upgrade
from blip2_service.store.migrate import StoreSetupError, current_revision

pytestmark = pytest.mark.postgres


def _caption(n: int, text_: str = "a dog on a beach") -> NewCaption:
    return NewCaption(
        ImageInfo(f"{n:064x}", 100, 10, 10, "JPEG"),
        Sighting("http", f"upload:{n}"),
        "m",
        GenerationSettings(),
        "succeeded",
        [text_],
        [{"emoji": "🐕", "word": "dog"}],
        None,
        0.1,
    )


def _foreign_tables(url: str) -> None:
    """What another application (windmill, say) keeps in `public`: its own images and Alembic table."""
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE public.images (image_id serial PRIMARY KEY, image_url text)"))
        conn.execute(text("INSERT INTO public.images (image_url) VALUES ('http://x/1.jpg')"))
        conn.execute(text("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)"))
        conn.execute(text("INSERT INTO public.alembic_version VALUES ('f00dcafe1234')"))
    engine.dispose()


def _public_state(url: str) -> tuple[list[str], str]:
    engine = create_engine(url)
    with engine.connect() as conn:
        tables = sorted(
            r[0]
            for r in conn.execute(text("SELECT table_name FROM information_schema.tables WHERE table_schema='public'"))
        )
        version = conn.execute(text("SELECT version_num FROM public.alembic_version")).scalar_one()
    engine.dispose()
    return tables, version


def test_our_tables_live_in_db_schema_beside_another_applications_images_table(pg_url: str) -> None:
    _foreign_tables(pg_url)
    engine = make_engine(pg_url)
    upgrade(engine)
    assert current_revision(engine) == "0002"
    store = CaptionRepository(engine)
    item, created = store.save(_caption(1))
    assert created and store.get(item["id"]) is not None
    found, _ = store.query(CaptionFilter(q="beach"))
    assert [f["id"] for f in found] == [item["id"]]
    assert _public_state(pg_url) == (["alembic_version", "images"], "f00dcafe1234")  # untouched
    check = create_engine(pg_url)
    with check.connect() as conn:
        ours = {
            r[0]
            for r in conn.execute(text("SELECT table_name FROM information_schema.tables WHERE table_schema='blip2'"))
        }
    check.dispose()
    assert {"images", "sightings", "captions", "alembic_version"} <= ours
    upgrade(engine)  # idempotent
    engine.dispose()


def test_a_deployment_from_before_db_schema_is_moved_into_it_with_its_rows(pg_url: str) -> None:
    old = make_engine(pg_url, schema="public")  # the layout every earlier version created
    upgrade(old)
    saved, _ = CaptionRepository(old).save(_caption(7, "a red bus on the street"))
    old.dispose()
    engine = make_engine(pg_url)
    upgrade(engine)
    store = CaptionRepository(engine)
    assert store.get(saved["id"])["text"] == "a red bus on the street"  # type: ignore[index]
    assert store.query(CaptionFilter(q="bus"))[0]
    more, created = store.save(_caption(8))
    assert created and more["id"] > saved["id"]  # the id sequence moved along
    check = create_engine(pg_url)
    with check.connect() as conn:
        public = conn.execute(text("SELECT count(*) FROM information_schema.tables WHERE table_schema='public'"))
        assert public.scalar_one() == 0
    check.dispose()
    engine.dispose()


def test_a_clash_with_tables_that_are_not_ours_is_one_line_naming_the_setting(pg_url: str) -> None:
    _foreign_tables(pg_url)
    engine = make_engine(pg_url, schema="public")
    with pytest.raises(StoreSetupError, match="DB_SCHEMA") as info:
        upgrade(engine)
    assert "\n" not in str(info.value) and "not this service's" in str(info.value)
    engine.dispose()
    done = subprocess.run(
        [sys.executable, "-m", "blip2_service.cli", "db", "upgrade"],
        env={"DATABASE_URL": pg_url, "DB_SCHEMA": "public", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "DB_SCHEMA" in lines[0] and "Traceback" not in done.stderr
    assert _public_state(pg_url) == (["alembic_version", "images"], "f00dcafe1234")
