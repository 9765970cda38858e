"""The schema: images (by sha256), sightings (where each was seen) and captions.

A caption is unique on (image, model, generation settings): that unique key
is what makes redelivery, re-scan and restart idempotent across processes
and hosts, not any in-memory bookkeeping.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.engine import Dialect

from ..domain import utf8_text

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class Utf8Text(TypeDecorator[str]):
    """Text from outside (file names, message ids, error lines naming them), written as UTF-8.

    A file name that is not UTF-8, or a lone surrogate from a JSON message, cannot be encoded
    for either database, and Postgres refuses NUL: `utf8_text` spells those characters out. It
    applies to every value bound to such a column, comparisons included, so a look-up by the
    raw name finds the row stored under it. Same DDL as Text: no migration.
    """

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect: Dialect) -> str | None:
        return None if value is None else utf8_text(value)


# SQLite only autoincrements INTEGER PRIMARY KEY; Postgres gets BIGINT identity.
_Id = BigInteger().with_variant(Integer(), "sqlite")

images = Table(
    "images",
    metadata,
    Column("sha256", String(64), primary_key=True),
    Column("width", Integer, nullable=True),
    Column("height", Integer, nullable=True),
    Column("format", String(16), nullable=True),
    Column("byte_size", BigInteger, nullable=False),
    Column("thumbnail", LargeBinary, nullable=True),
    Column("created_at", DateTime(timezone=True), nullable=False),
)

sightings = Table(
    "sightings",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("image_sha256", String(64), ForeignKey("images.sha256"), nullable=False),
    Column("source", String(16), nullable=False),
    Column("source_ref", Utf8Text, nullable=False),
    Column("file_size", BigInteger, nullable=True),
    Column("file_mtime", Float, nullable=True),
    Column("first_seen_at", DateTime(timezone=True), nullable=False),
    Column("last_seen_at", DateTime(timezone=True), nullable=False),
    Column("gone_at", DateTime(timezone=True), nullable=True),
    UniqueConstraint("source", "source_ref", "image_sha256"),
    Index("ix_sightings_image_sha256", "image_sha256"),
    Index("ix_sightings_source_ref", "source_ref"),
)

captions = Table(
    "captions",
    metadata,
    Column("id", _Id, primary_key=True, autoincrement=True),
    Column("image_sha256", String(64), ForeignKey("images.sha256"), nullable=False),
    Column("model", String(200), nullable=False),
    Column("settings_key", String(32), nullable=False),
    Column("settings", JSON, nullable=False),
    Column("status", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("texts", JSON, nullable=False),
    Column("emoji_mappings", JSON, nullable=False),
    Column("emoji_words", Text, nullable=False),
    Column("error", Utf8Text, nullable=True),
    Column("processing_time", Float, nullable=False),
    Column("source", String(16), nullable=False),
    Column("source_ref", Utf8Text, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    UniqueConstraint("image_sha256", "model", "settings_key"),
    Index("ix_captions_source_id", "source", "id"),
    Index("ix_captions_model_id", "model", "id"),
    Index("ix_captions_status_id", "status", "id"),
    Index("ix_captions_created_at", "created_at"),
    Index("ix_captions_source_ref", "source_ref"),
)
