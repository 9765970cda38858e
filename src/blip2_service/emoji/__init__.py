"""Caption words to emojis: bundled CLDR-derived table, curated overrides, lemmas, optional refresh."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .mapper import EmojiMapper
from .table import EmojiTable, load_bundled, load_table

if TYPE_CHECKING:
    from ..config import Settings


def build_mapper(settings: Settings) -> EmojiMapper:
    table = load_table(
        url=settings.emoji_mappings_url,
        auto_update=settings.auto_update,
        cache_dir=settings.data_dir,
        timeout=settings.url_timeout,
    )
    return EmojiMapper(table.table, table.stopwords)


__all__ = ["EmojiMapper", "EmojiTable", "build_mapper", "load_bundled", "load_table"]
