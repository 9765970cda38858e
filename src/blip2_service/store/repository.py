"""Everything the service asks of its database, behind one class, the same on SQLite and Postgres.

Writes are idempotent (insert-or-ignore on the natural keys), so any number
of processes may save the same image at once and exactly one caption row
results. Connection failures are retried with backoff and then surface as
`TransientError`, which callers treat as "try again later", never "lost".
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine, and_, bindparam, exists, func, literal_column, select, text, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite

from ..domain import GenerationSettings, TransientError
from ..retry import STORE, Backoff
from .engine import SQLITE_BUSY_SECONDS
from .rows import CaptionItem, ImageDetail
from .tables import captions, images, sightings

log = logging.getLogger(__name__)

T = TypeVar("T")
# Below this much free space next to an SQLite file, /health calls the store down: a save needs
# room for its pages and journal (a caption with its thumbnail: tens of KiB).
SQLITE_MIN_FREE = 1 << 20
_SEARCH_WORD = re.compile(r"[^\W_]+", re.UNICODE)


def emoji_token(glyph: str) -> str:
    """An emoji as one word the full-text index keeps (`emoji01f415` for 🐕): both engines' parsers
    drop symbols. Six hex digits a code point, variation selectors left out (🛋️ is 🛋)."""
    return "emoji" + "".join(f"{ord(c):06x}" for c in glyph if c != "\ufe0f")


def search_words(mappings: Sequence[Mapping[str, str]]) -> str:
    """The `emoji_words` column the full-text index reads beside the caption: each mapped word,
    then each emoji's token."""
    return " ".join([*(m["word"].replace("_", " ") for m in mappings), *(emoji_token(m["emoji"]) for m in mappings)])


@dataclass(frozen=True, slots=True)
class ImageInfo:
    sha256: str
    byte_size: int
    width: int | None = None
    height: int | None = None
    format: str | None = None
    thumbnail: bytes | None = None


@dataclass(frozen=True, slots=True)
class Sighting:
    source: str
    source_ref: str
    file_size: int | None = None
    file_mtime: float | None = None


@dataclass(frozen=True, slots=True)
class NewCaption:
    image: ImageInfo
    sighting: Sighting
    model: str
    settings: GenerationSettings
    status: str
    texts: list[str]
    emoji_mappings: list[dict[str, str]]
    error: str | None
    processing_time: float


@dataclass(frozen=True, slots=True)
class CaptionFilter:
    q: str | None = None
    source: str | None = None
    model: str | None = None
    status: str | None = None
    path: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    # Emojis every matching caption's mappings hold, without variation selectors ("🛋" for "🛋️").
    emojis: tuple[str, ...] = ()


# Ids are 64-bit integers in both engines; anything larger names no row.
MAX_ID = 2**63 - 1


def encode_cursor(last_id: int) -> str:
    """The next page starts below this id. Plain digits: opaque to clients, checkable by a pattern."""
    return str(last_id)


def decode_cursor(cursor: str) -> int:
    """Raises ValueError for anything that is not 1-19 ASCII digits; past the largest id means the top."""
    if not cursor.isascii() or not cursor.isdigit() or len(cursor) > 19:
        raise ValueError("not a cursor")
    return min(int(cursor), MAX_ID + 1)


def _now() -> datetime:
    return datetime.now(UTC)


class CaptionRepository:
    def __init__(self, engine: Engine, retry: Backoff = STORE, sleep: Callable[[float], None] = time.sleep) -> None:
        self.engine = engine
        self.dialect = engine.dialect.name
        self.retry = retry
        self._sleep = sleep
        self._insert = postgresql.insert if self.dialect == "postgresql" else sqlite.insert
        # Built once and executed with parameters: building them per save (literal values, the
        # `excluded` proxies) was about 70 % of save()'s time (bench/store.py's profile).
        self._image_upsert, self._image_insert = self._image_statements()
        self._sighting_upsert = self._sighting_statement()
        self._caption_insert = self._insert(captions).on_conflict_do_nothing().returning(captions.c.id)
        self._caption_by_id = select(captions).where(captions.c.id == bindparam("caption_id"))
        self._caption_by_key = select(captions).where(
            captions.c.image_sha256 == bindparam("key_sha256"),
            captions.c.model == bindparam("key_model"),
            captions.c.settings_key == bindparam("key_settings"),
        )

    def _image_statements(self) -> tuple[Any, Any]:
        """Insert an image; the upsert (with a thumbnail) fills a thumbnail gap but never overwrites:
        a failed decode left none, and other bytes cannot share the sha."""
        stmt = self._insert(images)
        upsert = stmt.on_conflict_do_update(
            index_elements=[images.c.sha256],
            set_={
                "thumbnail": stmt.excluded.thumbnail,
                "width": stmt.excluded.width,
                "height": stmt.excluded.height,
                "format": stmt.excluded.format,
            },
            where=images.c.thumbnail.is_(None),
        )
        return upsert, stmt.on_conflict_do_nothing()

    def _sighting_statement(self) -> Any:
        stmt = self._insert(sightings)
        return stmt.on_conflict_do_update(
            index_elements=[sightings.c.source, sightings.c.source_ref, sightings.c.image_sha256],
            set_={
                "last_seen_at": stmt.excluded.last_seen_at,
                "file_size": stmt.excluded.file_size,
                "file_mtime": stmt.excluded.file_mtime,
                "gone_at": None,
            },
        )

    # -- plumbing -------------------------------------------------------------------------

    def _retrying(self, what: str, fn: Callable[[], T]) -> T:
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn()
            except (sa_exc.OperationalError, sa_exc.InterfaceError) as exc:
                # Drop pooled connections: one opened while the file was read-only (or to a
                # database that has since restarted) stays broken, a new one may not be.
                self.engine.dispose()
                # A lock held by another SQLite writer was already waited on for SQLITE_BUSY_SECONDS
                # inside SQLite: waiting that long again per attempt would hold a request minutes.
                locked = self.dialect == "sqlite" and "locked" in str(exc.orig)
                if locked or self.retry.gives_up_after(attempt):
                    raise TransientError(
                        f"The store is unavailable ({what}): {str(exc.orig).strip().splitlines()[0]}",
                        retry_after=5,
                    ) from exc
                delay = self.retry.delay(attempt)
                log.warning("store %s failed (attempt %d), retrying in %.1fs: %s", what, attempt, delay, exc.orig)
                self._sleep(delay)

    @contextmanager
    def _tx(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    def ping(self) -> bool:
        try:
            with self.engine.connect() as conn:
                conn.execute(select(1))
            return True
        except sa_exc.SQLAlchemyError:
            return False

    def write_problem(self) -> str | None:
        """Why the store cannot take writes now (down, read-only, ...), or None when it can.

        Writes a no-op update and rolls it back: only a real write shows a read-only file or
        database (a read, or even SQLite's write lock, succeeds there).
        """
        try:
            with self.engine.connect() as conn:
                if self.dialect == "sqlite":
                    conn.exec_driver_sql("PRAGMA busy_timeout=200")
                    conn.commit()
                try:
                    with conn.begin() as tx:
                        conn.execute(text("UPDATE alembic_version SET version_num = version_num"))
                        tx.rollback()
                except sa_exc.OperationalError as exc:
                    if "locked" not in str(exc.orig):  # another writer holds the lock: writable
                        raise
                finally:
                    if self.dialect == "sqlite":
                        conn.exec_driver_sql(f"PRAGMA busy_timeout={SQLITE_BUSY_SECONDS * 1000}")
            return self._sqlite_disk_problem()
        except sa_exc.SQLAlchemyError as exc:
            self.engine.dispose()
            orig = getattr(exc, "orig", None) or exc
            return str(orig).strip().splitlines()[0] if str(orig).strip() else type(exc).__name__

    def _sqlite_disk_problem(self) -> str | None:
        """A full disk under an SQLite file, which the probe above cannot see: a rolled-back
        update needs no new space, a save does (its pages, the journal). Postgres's own disk is
        the server's to watch; its saves fail with the reason."""
        database = self.engine.url.database
        if self.dialect != "sqlite" or not database or database == ":memory:":
            return None
        folder = Path(database).resolve().parent
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            return None
        if free < SQLITE_MIN_FREE:
            return f"database or disk is full: {free // 1024} KiB free for the database in {folder}"
        return None

    # -- writes ---------------------------------------------------------------------------

    def save(self, new: NewCaption, *, replace: bool = False) -> tuple[CaptionItem, bool]:
        """Store a caption (or return the one already there) and record the sighting, atomically.

        Returns the stored item and whether this call created it. A stored
        `failed` caption is replaced by a later success for the same key, and
        `replace=True` (an explicit refresh) replaces whatever is stored.
        """
        return self._retrying("save", lambda: self._save(new, replace))

    def _save(self, new: NewCaption, replace: bool) -> tuple[CaptionItem, bool]:
        now = _now()
        key = new.settings.key()
        values = {
            "image_sha256": new.image.sha256,
            "model": new.model,
            "settings_key": key,
            "settings": new.settings.as_dict(),
            "status": new.status,
            "text": new.texts[0] if new.texts else "",
            "texts": new.texts,
            "emoji_mappings": new.emoji_mappings,
            "emoji_words": search_words(new.emoji_mappings),
            "error": new.error,
            "processing_time": round(new.processing_time, 3),
            "source": new.sighting.source,
            "source_ref": new.sighting.source_ref,
            "created_at": now,
        }
        with self._tx() as conn:
            self._upsert_image(conn, new.image, now)
            self._upsert_sighting(conn, new.image.sha256, new.sighting, now)
            inserted = conn.execute(self._caption_insert, values).scalar_one_or_none()
            created = inserted is not None
            if not created:
                row = conn.execute(
                    self._caption_by_key,
                    {"key_sha256": new.image.sha256, "key_model": new.model, "key_settings": key},
                ).one()
                inserted = row.id
                if replace or (row.status == "failed" and new.status == "succeeded"):
                    conn.execute(update(captions).where(captions.c.id == row.id).values(**values))
            assert inserted is not None
            item = self._get(conn, int(inserted))
        assert item is not None
        return item, created

    def _upsert_image(self, conn: Connection, image: ImageInfo, now: datetime) -> None:
        stmt = self._image_upsert if image.thumbnail is not None else self._image_insert
        conn.execute(
            stmt,
            {
                "sha256": image.sha256,
                "width": image.width,
                "height": image.height,
                "format": image.format,
                "byte_size": image.byte_size,
                "thumbnail": image.thumbnail,
                "created_at": now,
            },
        )

    def _upsert_sighting(self, conn: Connection, sha: str, sighting: Sighting, now: datetime) -> None:
        conn.execute(
            self._sighting_upsert,
            {
                "image_sha256": sha,
                "source": sighting.source,
                "source_ref": sighting.source_ref,
                "file_size": sighting.file_size,
                "file_mtime": sighting.file_mtime,
                "first_seen_at": now,
                "last_seen_at": now,
                "gone_at": None,
            },
        )

    def record_sighting(self, image: ImageInfo, sighting: Sighting) -> None:
        def run() -> None:
            now = _now()
            with self._tx() as conn:
                self._upsert_image(conn, image, now)
                self._upsert_sighting(conn, image.sha256, sighting, now)

        self._retrying("record sighting", run)

    def mark_gone(self, source: str, source_ref: str) -> int:
        def run() -> int:
            with self._tx() as conn:
                result = conn.execute(
                    update(sightings)
                    .where(
                        sightings.c.source == source,
                        sightings.c.source_ref == source_ref,
                        sightings.c.gone_at.is_(None),
                    )
                    .values(gone_at=_now())
                )
                return int(getattr(result, "rowcount", 0) or 0)

        return self._retrying("mark gone", run)

    # -- reads ----------------------------------------------------------------------------

    def find_caption(self, sha: str, model: str, settings: GenerationSettings) -> CaptionItem | None:
        def run() -> CaptionItem | None:
            with self.engine.connect() as conn:
                key = {"key_sha256": sha, "key_model": model, "key_settings": settings.key()}
                row = conn.execute(self._caption_by_key, key).first()
                return _item(row._mapping) if row is not None else None

        return self._retrying("find caption", run)

    def known_files(self, source: str | None, prefix: str) -> dict[str, tuple[int | None, float | None]]:
        """(size, mtime) of every live sighting under a folder: the watcher's catch-up skips these.

        Only paths whose caption is stored count (a failed caption counts too: the
        same bytes would fail the same way), so a crash between sighting and caption
        is caught up.
        """

        def run() -> dict[str, tuple[int | None, float | None]]:
            conditions = [
                sightings.c.source_ref.startswith(prefix, autoescape=True),
                sightings.c.gone_at.is_(None),
                exists().where(captions.c.image_sha256 == sightings.c.image_sha256),
            ]
            if source is not None:
                conditions.append(sightings.c.source == source)
            with self.engine.connect() as conn:
                rows = conn.execute(
                    select(sightings.c.source_ref, sightings.c.file_size, sightings.c.file_mtime).where(*conditions)
                )
                return {r.source_ref: (r.file_size, r.file_mtime) for r in rows}

        return self._retrying("known files", run)

    def get(self, caption_id: int) -> CaptionItem | None:
        def run() -> CaptionItem | None:
            with self.engine.connect() as conn:
                return self._get(conn, caption_id)

        return self._retrying("get caption", run)

    def _get(self, conn: Connection, caption_id: int) -> CaptionItem | None:
        row = conn.execute(self._caption_by_id, {"caption_id": caption_id}).first()
        return _item(row._mapping) if row is not None else None

    def query(
        self, filters: CaptionFilter, *, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[CaptionItem], str | None]:
        """Newest first, keyset-paginated on id: inserts during paging never shift a page."""
        after = decode_cursor(cursor) if cursor else None

        def run() -> tuple[list[CaptionItem], str | None]:
            query = select(captions).order_by(captions.c.id.desc()).limit(limit + 1)
            conditions = self._conditions(filters)
            if after is not None:
                conditions.append(captions.c.id < after)
            if conditions:
                query = query.where(and_(*conditions))
            with self.engine.connect() as conn:
                rows = conn.execute(query).fetchall()
            items = [_item(r._mapping) for r in rows[:limit]]
            next_cursor = encode_cursor(items[-1]["id"]) if len(rows) > limit else None
            return items, next_cursor

        return self._retrying("list captions", run)

    def local_copies(self, filters: CaptionFilter) -> list[tuple[str, list[str]]]:
        """Images with a caption matching `filters`, each with the local paths it was seen at
        (newest sighting first, gone ones last): what re-captioning can read again."""

        def run() -> list[tuple[str, list[str]]]:
            chosen = select(captions.c.image_sha256).distinct()
            conditions = self._conditions(filters)
            if conditions:
                chosen = chosen.where(and_(*conditions))
            query = (
                select(sightings.c.image_sha256, sightings.c.source_ref)
                .where(sightings.c.image_sha256.in_(chosen))
                .order_by(
                    sightings.c.image_sha256,
                    sightings.c.gone_at.is_not(None),
                    sightings.c.last_seen_at.desc(),
                )
            )
            with self.engine.connect() as conn:
                rows = conn.execute(query).fetchall()
            found: dict[str, list[str]] = {}
            for row in rows:
                paths = found.setdefault(row.image_sha256, [])
                if row.source_ref.startswith("/"):  # a file's path; URLs, uploads and message ids are not
                    paths.append(row.source_ref)
            return list(found.items())

        return self._retrying("select images", run)

    def _conditions(self, f: CaptionFilter) -> list[Any]:
        out: list[Any] = []
        if f.source:
            out.append(captions.c.source == f.source)
        if f.model:
            out.append(captions.c.model == f.model)
        if f.status:
            out.append(captions.c.status == f.status)
        if f.since:
            out.append(captions.c.created_at >= self._ts(f.since))
        if f.until:
            out.append(captions.c.created_at < self._ts(f.until))
        if f.path:
            out.append(
                exists().where(
                    sightings.c.image_sha256 == captions.c.image_sha256,
                    sightings.c.source_ref.startswith(f.path, autoescape=True),
                )
            )
        words = [w.lower() for w in _SEARCH_WORD.findall(f.q or "")]
        # "dog's" -> dog: lone letters only count when they are all the query has.
        words = [w for w in words if len(w) > 1] or words
        if words or f.emojis:
            out.append(self._search(words, [emoji_token(glyph) for glyph in f.emojis]))
        return out

    def _search(self, words: list[str], exact: list[str]) -> Any:
        # Every term must match; the last word as a prefix, so the search box works as you type.
        prefix = words[-1:]
        exact = [*exact, *words[:-1]]
        if self.dialect == "sqlite":
            match = " ".join([*(f'"{w}"' for w in exact), *(f'"{w}"*' for w in prefix)])
            return captions.c.id.in_(
                select(literal_column("rowid"))
                .select_from(text("captions_fts"))
                .where(text("captions_fts MATCH :fts_query").bindparams(fts_query=match))
            )
        query = " & ".join([*exact, *(f"{w}:*" for w in prefix)])
        return text("captions.search @@ to_tsquery('simple', :ts_query)").bindparams(ts_query=query)

    def _ts(self, value: datetime) -> datetime:
        value = value if value.tzinfo else value.replace(tzinfo=UTC)
        value = value.astimezone(UTC)
        # SQLite keeps DateTime as text without an offset: compare in naive UTC.
        return value.replace(tzinfo=None) if self.dialect == "sqlite" else value

    def image(self, sha: str) -> ImageDetail | None:
        def run() -> ImageDetail | None:
            with self.engine.connect() as conn:
                img = conn.execute(
                    select(
                        images.c.sha256,
                        images.c.width,
                        images.c.height,
                        images.c.format,
                        images.c.byte_size,
                        images.c.created_at,
                    ).where(images.c.sha256 == sha)
                ).first()
                if img is None:
                    return None
                seen = conn.execute(
                    select(sightings).where(sightings.c.image_sha256 == sha).order_by(sightings.c.id)
                ).fetchall()
                caps = conn.execute(
                    select(captions).where(captions.c.image_sha256 == sha).order_by(captions.c.id)
                ).fetchall()
            return {
                "sha256": img.sha256,
                "width": img.width,
                "height": img.height,
                "format": img.format,
                "byte_size": img.byte_size,
                "first_seen_at": _iso(img.created_at),
                "locations": [
                    {
                        "source": s.source,
                        "source_ref": s.source_ref,
                        "first_seen_at": _iso(s.first_seen_at),
                        "last_seen_at": _iso(s.last_seen_at),
                        "gone_at": _iso(s.gone_at) if s.gone_at else None,
                    }
                    for s in seen
                ],
                "captions": [_item(c._mapping) for c in caps],
            }

        return self._retrying("image", run)

    def thumbnail(self, sha: str) -> bytes | None:
        def run() -> bytes | None:
            with self.engine.connect() as conn:
                value = conn.execute(select(images.c.thumbnail).where(images.c.sha256 == sha)).scalar()
                return bytes(value) if value is not None else None

        return self._retrying("thumbnail", run)

    def count(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(captions)).scalar_one())


def _iso(value: datetime) -> str:
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _item(row: Any) -> CaptionItem:
    return {
        "id": int(row["id"]),
        "image_sha256": row["image_sha256"],
        "source": row["source"],
        "source_ref": row["source_ref"],
        "model": row["model"],
        "text": row["text"],
        "texts": list(row["texts"] or []),
        "emoji_mappings": list(row["emoji_mappings"] or []),
        "status": "succeeded" if row["status"] == "succeeded" else "failed",  # the only two it stores
        "error": row["error"],
        "processing_time": row["processing_time"],
        "settings": dict(row["settings"] or {}),
        "created_at": _iso(row["created_at"]),
    }
