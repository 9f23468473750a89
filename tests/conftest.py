"""Fixtures shared by the whole suite: real SQLite and real PostgreSQL databases.

Every test that takes `db` runs once per backend. PostgreSQL comes from
CJM_TEST_POSTGRES_URL (`make test` sets it when a server answers); without it those
runs are skipped, except under CI=true, where a missing server fails them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from engine.db.database import Database
from engine.db.migrate import upgrade
from engine.db.schema import Base

POSTGRES_URL = os.environ.get("CJM_TEST_POSTGRES_URL")
IN_CI = os.environ.get("CI", "").lower() == "true"
BACKENDS = ("sqlite", "postgres")


def require_postgres() -> str:
    if POSTGRES_URL:
        return POSTGRES_URL
    if IN_CI:
        pytest.fail("CI=true but CJM_TEST_POSTGRES_URL is not set: PostgreSQL tests cannot run")
    pytest.skip("no PostgreSQL: set CJM_TEST_POSTGRES_URL (make test does when one answers)")


async def _create_schema(url: str) -> None:
    await upgrade(url)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied for each test (much faster than migrating each)."""
    import asyncio

    path = tmp_path_factory.mktemp("template") / "template.db"
    asyncio.run(_create_schema(f"sqlite+aiosqlite:///{path}"))
    return path


@contextmanager
def fresh_postgres_database(prefix: str) -> Iterator[str]:
    """A new, migrated PostgreSQL database, dropped on leaving."""
    import asyncio

    base_url = require_postgres()
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    asyncio.run(_autocommit(base_url, f'CREATE DATABASE "{name}"'))
    url = make_url(base_url).set(database=name).render_as_string(hide_password=False)
    try:
        asyncio.run(_create_schema(url))
        yield url
    finally:
        asyncio.run(_autocommit(base_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A database of its own for this test session."""
    with fresh_postgres_database("cjm_test") as url:
        yield url


async def _autocommit(url: str, statement: str) -> None:
    engine = create_async_engine(url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A URL to an empty, migrated database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "cjm.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        return f"sqlite+aiosqlite:///{path}"
    url: str = request.getfixturevalue("postgres_database")
    import asyncio

    asyncio.run(_truncate_all(url))
    return url


@pytest.fixture(params=BACKENDS)
def plan_database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A migrated database of each backend, of its own: statistics taken there must not
    outlive the test (what `tests/plans.py` explains is planned on them)."""
    if request.param == "sqlite":
        path = tmp_path / "cjm.db"
        shutil.copy(request.getfixturevalue("sqlite_template"), path)
        yield f"sqlite+aiosqlite:///{path}"
    else:
        with fresh_postgres_database("cjm_plans") as url:
            yield url


async def _truncate_all(url: str) -> None:
    database = Database(url)
    try:
        tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
        async with database.write() as connection:
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY"))
    finally:
        await database.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = Database(database_url)
    try:
        yield database
    finally:
        await database.close()
