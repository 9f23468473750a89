"""Hostile input against the real app: the API fixtures (a runtime on a real database and
an HTTP client on the app) are the ones tests/api uses.

Most of what is checked here is answered before any query (a refused key, a bad token, a
malformed body), so a module may run on SQLite alone by using `sqlite_only`; what the
database itself must withstand (SQL injection, storage) runs on each backend."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.api.conftest import client, runtime

__all__ = ["client", "runtime", "sqlite_database_url"]


@pytest.fixture
def sqlite_database_url(sqlite_template: Path, tmp_path: Path) -> str:
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    return f"sqlite+aiosqlite:///{path}"
