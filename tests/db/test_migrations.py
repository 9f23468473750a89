"""The migrations build exactly the schema `engine.db.schema` declares, on both backends.

Each test starts from a database of its own that nothing has touched: a new SQLite
file, or a new PostgreSQL database dropped afterwards.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, inspect, text
from sqlalchemy.engine import make_url

from engine.db.database import Database
from engine.db.migrate import (
    DatabaseNotMigrated,
    current_revision,
    downgrade,
    ensure_current,
    head_revision,
    upgrade,
)
from engine.db.schema import Base
from tests.conftest import BACKENDS, _autocommit, require_postgres

T = TypeVar("T")
NewDatabase = Callable[[], Awaitable[str]]


@pytest.fixture(params=BACKENDS)
async def new_database(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[NewDatabase]:
    """Makes empty databases of one backend; the PostgreSQL ones are dropped at the end."""
    created: list[str] = []
    base_url = require_postgres() if request.param == "postgres" else ""

    async def make() -> str:
        name = f"cjm_test_{uuid.uuid4().hex[:12]}"
        if request.param == "sqlite":
            return f"sqlite+aiosqlite:///{tmp_path / name}.db"
        await _autocommit(base_url, f'CREATE DATABASE "{name}"')
        created.append(name)
        return make_url(base_url).set(database=name).render_as_string(hide_password=False)

    yield make
    for name in created:
        await _autocommit(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def empty_url(new_database: NewDatabase) -> str:
    return await new_database()


async def _inspect(url: str, look: Callable[[Connection], T]) -> T:
    database = Database(url)
    try:
        async with database.read() as connection:
            return await connection.run_sync(look)
    finally:
        await database.close()


def _differences(connection: Connection) -> list[Any]:
    return list(compare_metadata(MigrationContext.configure(connection), Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


def _indexes(connection: Connection) -> dict[str, list[dict[str, Any]]]:
    """Every index as the database reports it, partial-index predicates included."""
    inspector = inspect(connection)
    return {
        table: sorted(
            (
                {
                    **index,
                    "dialect_options": {
                        option: str(value) for option, value in index["dialect_options"].items()
                    },
                }
                for index in inspector.get_indexes(table)
            ),
            key=lambda index: str(index["name"]),
        )
        for table in Base.metadata.tables
    }


async def test_migrations_create_exactly_the_declared_schema(empty_url: str) -> None:
    await upgrade(empty_url)

    assert await _inspect(empty_url, _differences) == []


async def test_migrations_create_the_declared_partial_index_predicates(
    new_database: NewDatabase,
) -> None:
    # Autogenerate does not compare an index's WHERE clause: compare what the database
    # reports for the migrated schema with what it reports for create_all's.
    migrated, declared = await new_database(), await new_database()
    await upgrade(migrated)
    database = Database(declared)
    try:
        async with database.write() as connection:
            await connection.run_sync(Base.metadata.create_all)
    finally:
        await database.close()

    migrated_indexes = await _inspect(migrated, _indexes)

    assert migrated_indexes == await _inspect(declared, _indexes)
    partial = {
        index["name"]
        for indexes in migrated_indexes.values()
        for index in indexes
        if any(option.endswith("_where") for option in index["dialect_options"])
    }
    assert partial == {
        "ix_events_pending",
        "ix_events_merges",
        "uq_enrollments_active",
        "uq_sequence_runs_active",
        "ix_audience_members_unsequenced",
        "ix_emails_queue",
        "ix_outbox_pending_grants",
    }


async def test_upgrade_twice_changes_nothing_the_second_time(empty_url: str) -> None:
    await upgrade(empty_url)
    database = Database(empty_url)
    try:
        async with database.write() as connection:
            await connection.execute(
                text("INSERT INTO api_keys (name, key_hash, created_at) VALUES ('write', 'h', 0)")
            )
        await upgrade(empty_url)
        async with database.read() as connection:
            kept = (await connection.execute(text("SELECT name FROM api_keys"))).scalars().all()
    finally:
        await database.close()

    assert kept == ["write"]
    assert await current_revision(empty_url) == head_revision()
    assert await _inspect(empty_url, _differences) == []


async def test_upgrades_started_together_by_several_processes_all_succeed(empty_url: str) -> None:
    code = (
        "import asyncio, sys; from engine.db.migrate import upgrade; "
        "asyncio.run(upgrade(sys.argv[1]))"
    )
    processes = [
        await asyncio.create_subprocess_exec(sys.executable, "-c", code, empty_url)
        for _ in range(3)
    ]

    assert [await process.wait() for process in processes] == [0, 0, 0]
    assert await current_revision(empty_url) == head_revision()


async def test_ensure_current_refuses_an_unmigrated_database_with_the_upgrade_command(
    empty_url: str,
) -> None:
    with pytest.raises(DatabaseNotMigrated, match=r"run `cjm db upgrade`") as refused:
        await ensure_current(empty_url)

    assert head_revision() in str(refused.value)


async def test_ensure_current_refuses_a_database_migrated_by_a_newer_cjm(empty_url: str) -> None:
    await upgrade(empty_url)
    database = Database(empty_url)
    try:
        async with database.write() as connection:
            await connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    finally:
        await database.close()

    with pytest.raises(DatabaseNotMigrated, match="a newer cjm migrated it"):
        await ensure_current(empty_url)


async def test_ensure_current_accepts_a_database_at_head(empty_url: str) -> None:
    await upgrade(empty_url)

    await ensure_current(empty_url)


async def test_downgrade_to_base_leaves_no_tables(empty_url: str) -> None:
    await upgrade(empty_url)

    await downgrade(empty_url, "base")

    # Alembic keeps its own (now empty) version table.
    assert await _inspect(empty_url, _tables) == {"alembic_version"}
    assert await current_revision(empty_url) is None
