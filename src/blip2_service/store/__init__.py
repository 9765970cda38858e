"""Persistence: SQLAlchemy tables, the repository, and Alembic migrations (SQLite and Postgres)."""

from .engine import make_engine
from .migrate import upgrade
from .repository import (
    CaptionFilter,
    CaptionRepository,
    ImageInfo,
    NewCaption,
    Sighting,
    decode_cursor,
    encode_cursor,
)
from .rows import CaptionItem, ImageDetail, Location

__all__ = [
    "CaptionFilter",
    "CaptionItem",
    "CaptionRepository",
    "ImageDetail",
    "ImageInfo",
    "Location",
    "NewCaption",
    "Sighting",
    "decode_cursor",
    "encode_cursor",
    "make_engine",
    "upgrade",
]
