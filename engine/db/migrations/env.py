"""Alembic's environment: run the migrations on the connection `engine.db.migrate` passes.

That connection comes from an async engine (`AsyncConnection.run_sync`) and is already
in a transaction, which commits only when every migration has run.
"""

from alembic import context
from sqlalchemy import Connection

from engine.db.schema import Base

connection: Connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite alters most things only by copying the table: let Alembic do that.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
