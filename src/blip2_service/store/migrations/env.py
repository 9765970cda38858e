"""Alembic environment: the connection is handed in by `store.migrate`, never read from a file."""

from __future__ import annotations

from alembic import context

from blip2_service.store.tables import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `blip2-service db upgrade`, which passes a connection")

schema = context.config.attributes.get("schema") if connection.dialect.name == "postgresql" else None
context.configure(connection=connection, target_metadata=metadata, render_as_batch=True, version_table_schema=schema)
with context.begin_transaction():
    context.run_migrations()
