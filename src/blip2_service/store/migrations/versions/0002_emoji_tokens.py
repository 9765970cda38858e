"""Emojis in the full-text index: each caption's `emoji_words` gains a token per emoji.

Both engines' parsers drop symbols, so a search for 🦓 could only scan every caption's mappings.
New rows get the tokens from the repository; this fills them in for the rows already stored, in
batches (the index follows: SQLite's triggers, Postgres' generated column). The token is spelled
here as it was at this revision, not imported, so the migration stays what it was.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_BATCH = 5000
_captions = sa.table(
    "captions", sa.column("id", sa.BigInteger), sa.column("emoji_mappings", sa.JSON), sa.column("emoji_words", sa.Text)
)


def _token(glyph: str) -> str:
    return "emoji" + "".join(f"{ord(c):06x}" for c in glyph if c != "\ufe0f")


def _words(mappings: list[dict[str, str]], with_tokens: bool) -> str:
    words = [m["word"].replace("_", " ") for m in mappings]
    return " ".join(words + ([_token(m["emoji"]) for m in mappings] if with_tokens else []))


def _rewrite(with_tokens: bool) -> None:
    bind = op.get_bind()
    last = 0
    while True:
        rows = bind.execute(
            sa.select(_captions.c.id, _captions.c.emoji_mappings)
            .where(_captions.c.id > last)
            .order_by(_captions.c.id)
            .limit(_BATCH)
        ).fetchall()
        if not rows:
            return
        changes: list[dict[str, Any]] = []
        for row in rows:
            mappings = json.loads(row.emoji_mappings) if isinstance(row.emoji_mappings, str) else row.emoji_mappings
            if mappings:
                changes.append({"row_id": row.id, "words": _words(mappings, with_tokens)})
        if changes:
            bind.execute(
                sa.update(_captions)
                .where(_captions.c.id == sa.bindparam("row_id"))
                .values(emoji_words=sa.bindparam("words")),
                changes,
            )
        last = rows[-1].id


def upgrade() -> None:
    _rewrite(with_tokens=True)


def downgrade() -> None:
    _rewrite(with_tokens=False)
