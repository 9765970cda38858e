"""Engines tuned for this workload: SQLite in WAL with a busy timeout, Postgres with a pool."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url

# How long a write waits for another SQLite writer's lock before it fails "database is locked".
# Our own writes hold it for milliseconds; a lock held longer (a `sqlite3` shell left in a
# transaction, a backup tool) is reported as the store being unavailable (503, retried) after
# one such wait, not after minutes.
SQLITE_BUSY_SECONDS = 5

# A database host that vanishes without closing its connections (a network partition, a frozen
# VM) would leave a query waiting ~15 minutes for the kernel to give up (tcp_retries2), with the
# HTTP request, the health check or the watcher waiting behind it: unacknowledged data fails the
# connection after 10 s instead, an idle one is probed after 30 s, and a connect gives up after 5.
PG_CONNECT_ARGS = {
    "connect_timeout": 5,
    "tcp_user_timeout": 10_000,  # ms; libpq 12+ (psycopg[binary] ships its own, 18 here)
    "keepalives": 1,
    "keepalives_idle": 30,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def make_engine(url: str, *, schema: str = "blip2", echo: bool = False) -> Engine:
    """`schema`: on Postgres, the schema that holds this service's tables and its Alembic version
    table (DB_SCHEMA), and the only one its connections see; SQLite has none."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            echo=echo,
            connect_args={"timeout": SQLITE_BUSY_SECONDS, "check_same_thread": False},
            pool_size=8,
            max_overflow=8,
        )
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        # Plain postgresql:// would pick psycopg2, which we do not ship.
        parsed = parsed.set(drivername="postgresql+psycopg")
    engine = create_engine(
        parsed,
        echo=echo,
        pool_size=8,
        max_overflow=8,
        pool_pre_ping=True,
        pool_recycle=1800,
        # the URL's own (?connect_timeout=20) win
        connect_args={key: value for key, value in PG_CONNECT_ARGS.items() if key not in parsed.query},
    )

    def search_path(dbapi_connection: Any, _record: Any) -> None:
        # Only our schema: unqualified names never reach another application's tables.
        with dbapi_connection.cursor() as cursor:
            cursor.execute(f"SET search_path TO {quote_identifier(schema)}")
        dbapi_connection.commit()

    event.listen(engine, "connect", search_path)
    return engine


def quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the HTTP server read while the watcher and consumer write; the busy
    # timeout turns writer contention into a short wait instead of "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()
