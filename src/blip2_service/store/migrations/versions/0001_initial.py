"""Initial schema: images, sightings, captions and full-text search.

Revision ID: 0001
Revises:
Create Date: 2026-11-27
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "images",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("width", sa.Integer, nullable=True),
        sa.Column("height", sa.Integer, nullable=True),
        sa.Column("format", sa.String(16), nullable=True),
        sa.Column("byte_size", sa.BigInteger, nullable=False),
        sa.Column("thumbnail", sa.LargeBinary, nullable=True),
        sa.Column("created_at", _TS, nullable=False),
    )
    op.create_table(
        "sightings",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("image_sha256", sa.String(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_ref", sa.Text, nullable=False),
        sa.Column("file_size", sa.BigInteger, nullable=True),
        sa.Column("file_mtime", sa.Float, nullable=True),
        sa.Column("first_seen_at", _TS, nullable=False),
        sa.Column("last_seen_at", _TS, nullable=False),
        sa.Column("gone_at", _TS, nullable=True),
        sa.UniqueConstraint("source", "source_ref", "image_sha256", name="uq_sightings_source_source_ref_image_sha256"),
    )
    op.create_index("ix_sightings_image_sha256", "sightings", ["image_sha256"])
    op.create_index("ix_sightings_source_ref", "sightings", ["source_ref"])
    op.create_table(
        "captions",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("image_sha256", sa.String(64), sa.ForeignKey("images.sha256"), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("settings_key", sa.String(32), nullable=False),
        sa.Column("settings", sa.JSON, nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("text", sa.Text, nullable=False),
        sa.Column("texts", sa.JSON, nullable=False),
        sa.Column("emoji_mappings", sa.JSON, nullable=False),
        sa.Column("emoji_words", sa.Text, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("processing_time", sa.Float, nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("source_ref", sa.Text, nullable=False),
        sa.Column("created_at", _TS, nullable=False),
        sa.UniqueConstraint(
            "image_sha256", "model", "settings_key", name="uq_captions_image_sha256_model_settings_key"
        ),
    )
    op.create_index("ix_captions_source_id", "captions", ["source", "id"])
    op.create_index("ix_captions_model_id", "captions", ["model", "id"])
    op.create_index("ix_captions_status_id", "captions", ["status", "id"])
    op.create_index("ix_captions_created_at", "captions", ["created_at"])
    op.create_index("ix_captions_source_ref", "captions", ["source_ref"])

    if op.get_bind().dialect.name == "sqlite":
        # External-content FTS5 index kept in step by triggers; unicode61 without stemming
        # tokenises like Postgres' 'simple' configuration, so both engines find the same rows.
        op.execute(
            "CREATE VIRTUAL TABLE captions_fts USING fts5("
            "text, emoji_words, content='captions', content_rowid='id', tokenize='unicode61')"
        )
        op.execute(
            "CREATE TRIGGER captions_fts_ai AFTER INSERT ON captions BEGIN "
            "INSERT INTO captions_fts(rowid, text, emoji_words) VALUES (new.id, new.text, new.emoji_words); END"
        )
        op.execute(
            "CREATE TRIGGER captions_fts_ad AFTER DELETE ON captions BEGIN "
            "INSERT INTO captions_fts(captions_fts, rowid, text, emoji_words) "
            "VALUES ('delete', old.id, old.text, old.emoji_words); END"
        )
        op.execute(
            "CREATE TRIGGER captions_fts_au AFTER UPDATE ON captions BEGIN "
            "INSERT INTO captions_fts(captions_fts, rowid, text, emoji_words) "
            "VALUES ('delete', old.id, old.text, old.emoji_words); "
            "INSERT INTO captions_fts(rowid, text, emoji_words) VALUES (new.id, new.text, new.emoji_words); END"
        )
    else:
        op.execute(
            "ALTER TABLE captions ADD COLUMN search tsvector GENERATED ALWAYS AS "
            "(to_tsvector('simple', coalesce(text, '') || ' ' || coalesce(emoji_words, ''))) STORED"
        )
        op.execute("CREATE INDEX ix_captions_search ON captions USING GIN (search)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE IF EXISTS captions_fts")
    op.drop_table("captions")
    op.drop_table("sightings")
    op.drop_table("images")
