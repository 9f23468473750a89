"""API keys: generated once, stored only as hashes, stable across restarts."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from sqlalchemy import select

from engine.config import Settings
from engine.db.database import Database
from engine.db.schema import api_keys
from engine.keys import ApiKeys, KeyFromSettings


async def stored_rows(db: Database) -> dict[str, str]:
    async with db.read() as connection:
        rows = await connection.execute(select(api_keys.c.name, api_keys.c.key_hash))
        return {name: key_hash for name, key_hash in rows}


async def test_missing_keys_are_generated_with_their_prefixes(db: Database) -> None:
    keys, generated = await ApiKeys.load(db, Settings())
    assert generated["write"].startswith("wk_") and generated["admin"].startswith("ak_")
    assert keys.is_write_key(generated["write"]) and keys.is_admin_key(generated["admin"])
    assert not keys.is_write_key(generated["admin"]) and not keys.is_admin_key(generated["write"])


async def test_generated_keys_are_stored_only_as_sha256_hashes(db: Database) -> None:
    _, generated = await ApiKeys.load(db, Settings())
    rows = await stored_rows(db)
    assert rows == {
        name: hashlib.sha256(key.encode()).hexdigest() for name, key in generated.items()
    }
    async with db.read() as connection:
        table_text = repr(list(await connection.execute(select(api_keys))))
    assert all(key not in table_text for key in generated.values())


async def test_keys_are_generated_once_and_stable_across_restarts(db: Database) -> None:
    _, first = await ApiKeys.load(db, Settings())
    restarted, again = await ApiKeys.load(db, Settings())
    assert again == {}
    assert restarted.is_write_key(first["write"]) and restarted.is_admin_key(first["admin"])


async def test_two_processes_starting_at_once_agree_on_one_key(database_url: str) -> None:
    first_db, second_db = Database(database_url), Database(database_url)
    try:
        (first, first_new), (second, second_new) = await asyncio.gather(
            ApiKeys.load(first_db, Settings()), ApiKeys.load(second_db, Settings())
        )
    finally:
        await first_db.close()
        await second_db.close()
    for name in ("write", "admin"):
        printed = [new[name] for new in (first_new, second_new) if name in new]
        assert len(printed) == 1
        check = "is_write_key" if name == "write" else "is_admin_key"
        assert getattr(first, check)(printed[0]) and getattr(second, check)(printed[0])


async def test_keys_given_by_settings_are_used_as_is_and_not_stored(db: Database) -> None:
    keys, generated = await ApiKeys.load(db, Settings(write_key="my-write", admin_key="my-admin"))
    assert generated == {}
    assert keys.is_write_key("my-write") and keys.is_admin_key("my-admin")
    assert await stored_rows(db) == {}


async def test_rotate_replaces_the_stored_key(db: Database) -> None:
    keys, generated = await ApiKeys.load(db, Settings())
    rotated = await keys.rotate(db, "write")
    assert keys.is_write_key(rotated) and not keys.is_write_key(generated["write"])
    restarted, _ = await ApiKeys.load(db, Settings())
    assert restarted.is_write_key(rotated)
    assert (await stored_rows(db))["write"] == hashlib.sha256(rotated.encode()).hexdigest()


async def test_rotate_refuses_a_key_fixed_by_settings(db: Database) -> None:
    keys, _ = await ApiKeys.load(db, Settings(admin_key="my-admin"))
    with pytest.raises(KeyFromSettings, match="CJM_ADMIN_KEY"):
        await keys.rotate(db, "admin")


async def test_a_key_rotated_by_another_process_stops_working_at_the_next_refresh(
    db: Database,
) -> None:
    serving, generated = await ApiKeys.load(db, Settings())
    rotating, _ = await ApiKeys.load(db, Settings())
    old = generated["admin"]

    new = await rotating.rotate(db, "admin")
    assert serving.is_admin_key(old)

    await serving.refresh(db)
    assert not serving.is_admin_key(old)
    assert serving.is_admin_key(new)
