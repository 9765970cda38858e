"""Alembic, driven from code: migrations are the only way the schema is created.

On Postgres everything lives in DB_SCHEMA (default `blip2`), the Alembic version table too, so
the service can share a database with other applications (their own `images` table, their own
`alembic_version`). Deployments from before DB_SCHEMA kept the tables in `public`; `upgrade`
moves them into the schema first when, and only when, they are recognisably this service's.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection, Engine, text
from sqlalchemy import exc as sa_exc

from ..retry import STARTUP, Backoff
from .engine import quote_identifier

log = logging.getLogger(__name__)

_MIGRATIONS = Path(__file__).with_name("migrations")
OUR_TABLES = ("alembic_version", "images", "sightings", "captions")
_OUR_NAMING = re.compile(r"[0-9]{4}")  # how this service names its revisions; others' are hashes


class StoreSetupError(Exception):
    """The store cannot be set up as configured; the message is one line saying what to change."""


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(_MIGRATIONS))
    return config


def our_revisions() -> frozenset[str]:
    """Every revision in this version's migrations folder (read from it, so a new one counts)."""
    return frozenset(script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions())


class StoreUnavailable(StoreSetupError):
    """The database could not be reached within STARTUP_TIMEOUT."""


def upgrade_when_reachable(engine: Engine, timeout: float, backoff: Backoff = STARTUP) -> None:
    """`upgrade`, waiting up to `timeout` seconds for the database to come up (a compose stack
    starts everything at once), one log line per attempt; then StoreUnavailable, one line."""
    started = time.monotonic()
    attempt = 0
    where = engine.url.render_as_string(hide_password=True)
    while True:
        attempt += 1
        try:
            upgrade(engine)
            return
        except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
            reason = (
                str(exc.orig or exc).strip().splitlines()[0] if str(exc.orig or exc).strip() else type(exc).__name__
            )
            waited = time.monotonic() - started
            if waited >= timeout:
                raise StoreUnavailable(
                    f"cannot reach the database at {where} after {waited:.0f}s (STARTUP_TIMEOUT={timeout:g}): "
                    f"{reason}; check DATABASE_URL and that the database server is up"
                ) from None
            delay = min(backoff.delay(attempt), max(0.1, timeout - waited))
            log.warning(
                "waiting for the database at %s (attempt %d, %s); retrying in %.0fs - check DATABASE_URL",
                where,
                attempt,
                reason,
                delay,
            )
            engine.dispose()
            time.sleep(delay)


def upgrade(engine: Engine, revision: str = "head") -> None:
    config = alembic_config()
    schema = "public"
    try:
        with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                schema = _schema_of(connection)
                # Several workers may start at once against one database: serialise their upgrades.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(720122)")
                connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {quote_identifier(schema)}")
                _relocate_from_public(connection, schema)
            config.attributes["connection"] = connection
            config.attributes["schema"] = schema
            before = _revision_in(connection)
            started = time.monotonic()
            command.upgrade(config, revision)
            after = _revision_in(connection)
            if after != before:
                # A rewrite of stored rows can take a while on a large database: say what ran.
                log.info(
                    "database schema %s revision %s in %.1fs",
                    f"upgraded from revision {before} to" if before else "created at",
                    after,
                    time.monotonic() - started,
                )
    except sa_exc.ProgrammingError as exc:
        raise _clash(exc, schema) from None
    except CommandError as exc:
        found = _stored_revision(engine)
        if found is not None and _OUR_NAMING.fullmatch(found):
            raise StoreSetupError(
                f"the database is at revision {found}, migrated by a newer blip2-service than this one "
                f"(which knows up to {max(our_revisions())}); run that version here too"
            ) from None
        raise StoreSetupError(
            f"the Alembic version table in schema {schema!r} is not this service's ({exc}); "
            "another application's migrations? set DB_SCHEMA to a schema of its own (default blip2)"
        ) from None


def _revision_in(connection: Connection) -> str | None:
    """The revision in the version table that the connection's search path (DB_SCHEMA) finds."""
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(connection).get_current_revision()


def _stored_revision(engine: Engine) -> str | None:
    try:
        return current_revision(engine)
    except sa_exc.SQLAlchemyError:
        return None


def _schema_of(connection: Connection) -> str:
    """The schema make_engine's search_path names (DB_SCHEMA)."""
    first = str(connection.exec_driver_sql("SHOW search_path").scalar_one()).split(",")[0].strip()
    name = first[1:-1].replace('""', '"') if first.startswith('"') else first
    return "public" if name in ("", "$user") else name


def _relocate_from_public(connection: Connection, schema: str) -> None:
    """Move a pre-DB_SCHEMA deployment's tables from `public` into `schema` (once)."""
    if schema == "public" or _tables(connection, schema) & set(OUR_TABLES):
        return
    in_public = _tables(connection, "public")
    if not set(OUR_TABLES) <= in_public:
        return
    version = connection.execute(text("SELECT version_num FROM public.alembic_version")).scalar()
    has_ours = connection.execute(
        text(
            "SELECT count(*) FROM information_schema.columns WHERE table_schema = 'public' "
            "AND table_name = 'captions' AND column_name IN ('settings_key', 'emoji_words')"
        )
    ).scalar_one()
    if version not in our_revisions() or has_ours != 2:
        return  # another application's tables of the same names: leave them alone
    for table in OUR_TABLES:
        connection.exec_driver_sql(f"ALTER TABLE public.{table} SET SCHEMA {quote_identifier(schema)}")


def _tables(connection: Connection, schema: str) -> set[str]:
    rows = connection.execute(
        text("SELECT table_name FROM information_schema.tables WHERE table_schema = :s"), {"s": schema}
    )
    return {row[0] for row in rows}


def _clash(exc: sa_exc.ProgrammingError, schema: str | None) -> Exception:
    detail = str(exc.orig).strip().splitlines()[0] if exc.orig is not None else str(exc)
    if "already exists" in detail:
        return StoreSetupError(
            f"cannot create this service's tables in schema {schema!r}: {detail} and is not this "
            "service's; set DB_SCHEMA to a schema of its own (default blip2)"
        )
    return exc


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return _revision_in(connection)
