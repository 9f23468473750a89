"""Schema migrations: bring a database to the schema this code needs, or say it isn't.

Alembic is configured here rather than from an alembic.ini, with the scripts inside
the package, so `cjm db upgrade` works from an installed cjm in any directory. The
migrations run on a `Database.write()` connection: one transaction, and on SQLite
the same `BEGIN IMMEDIATE` writer as the engine, so they never race it.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection
from sqlalchemy.engine import make_url

from engine.db.database import Database

SCRIPT_LOCATION = Path(__file__).with_name("migrations")
# PostgreSQL advisory lock key ("cjm" in ASCII) held while migrating.
MIGRATION_LOCK = 0x636A6D


class DatabaseNotMigrated(Exception):
    """The database's schema is not the one this code was written for."""


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config())


def head_revision() -> str:
    """The revision this code needs."""
    head = _scripts().get_current_head()
    if head is None:
        raise RuntimeError(f"no migrations found in {SCRIPT_LOCATION}")
    return head


async def _run(url: str, alembic_command: Callable[[Config], None]) -> None:
    """Run an Alembic command on one write transaction; env.py picks up the connection."""

    def run(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Processes that start together wait for the first to migrate, then find
            # nothing left to do (SQLite's BEGIN IMMEDIATE already serialises them).
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        config = _config()
        config.attributes["connection"] = connection
        alembic_command(config)

    database = Database(url)
    try:
        async with database.write() as connection:
            await connection.run_sync(run)
    finally:
        await database.close()


async def upgrade(url: str) -> None:
    """Migrate the database to the head revision; a no-op when it is there already."""
    await _run(url, lambda config: command.upgrade(config, "head"))


async def downgrade(url: str, revision: str) -> None:
    """Migrate the database back to `revision` (`base` drops every table)."""
    await _run(url, lambda config: command.downgrade(config, revision))


async def current_revision(url: str) -> str | None:
    """The database's revision, or None when it was never migrated."""

    def read(connection: Connection) -> str | None:
        return MigrationContext.configure(connection).get_current_revision()

    database = Database(url)
    try:
        async with database.read() as connection:
            return await connection.run_sync(read)
    finally:
        await database.close()


async def ensure_current(url: str) -> None:
    """Refuse to run on a database whose schema is not the one this code was written for."""
    current = await current_revision(url)
    head = head_revision()
    if current == head:
        return
    where = make_url(url).render_as_string(hide_password=True)
    known = {script.revision for script in _scripts().walk_revisions()}
    if current is not None and current not in known:
        raise DatabaseNotMigrated(
            f"the database at {where} is at revision {current}, which this code does not know: "
            f"a newer cjm migrated it, so run that version"
        )
    raise DatabaseNotMigrated(
        f"the database at {where} is at revision {current or 'none (never migrated)'}, "
        f"the code needs {head}: run `cjm db upgrade`"
    )
