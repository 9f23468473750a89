"""Identifiers hashed ahead of the exports: stored by the audience job as the text the
exports send, read by exports while the lead's identity traits (as the database extracts
them) and the region still match, worked out afresh when not, and sent again in the
next sync when a member's identifiers change."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, literal_column, select, update

from channels.audiences.identities import (
    identifiers_sql,
    identity_row,
    platform_rows,
    refresh_all_identities,
    row_text,
    store_identity_rows,
)
from channels.audiences.normalize import google_row, meta_row
from engine.db.schema import audience_identities, leads
from engine.worker.changes import IDENTITY_TRAITS
from tests.audiences.test_exports import ADMIN, CATALOG, all_pages, meta, settle, sha
from tests.worker.conftest import FUNNEL, Engine, app_client, running_engine, write_funnel

MARK = ["stored"] * 8


@pytest.fixture
async def engine(database_url: str, tmp_path: Path) -> AsyncIterator[Engine]:
    async with running_engine(database_url, write_funnel(tmp_path, FUNNEL)) as engine:
        yield engine


@pytest.fixture
async def client(engine: Engine) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(engine.runtime, headers=ADMIN) as client:
        yield client


async def join(engine: Engine, user_id: str, **traits: Any) -> None:
    await engine.send("identify", userId=user_id, traits=traits)
    await engine.send("page", userId=user_id, properties=CATALOG)
    await settle(engine)


async def stored(engine: Engine) -> dict[int, Any]:
    """The stored rows by lead: region, identifiers, meta, google."""
    async with engine.runtime.db.read() as connection:
        rows = await connection.execute(select(audience_identities))
        return {row.lead_id: row for row in rows}


async def lead_of(engine: Engine, email: str) -> int:
    async with engine.runtime.db.read() as connection:
        lead_id = await connection.scalar(select(leads.c.id).where(leads.c.email == email))
    assert lead_id is not None
    return int(lead_id)


async def mark_stored_rows(engine: Engine) -> None:
    """Every stored Meta row replaced by a marker, to see which rows an export reads."""
    async with engine.runtime.db.write() as connection:
        await connection.execute(
            update(audience_identities).values(meta=orjson.dumps(MARK).decode())
        )


async def google_csv(client: httpx.AsyncClient) -> str:
    answer = await client.get("/v1/audiences/visitors/export", params={"format": "google"})
    assert answer.status_code == 200, answer.text
    return answer.text


async def test_the_audience_job_stores_each_members_rows_and_exports_read_them(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="Ann@Example.com", phone="+1 415 555 0100", city="Köln")
    lead_id = await lead_of(engine, "ann@example.com")

    row = (await stored(engine))[lead_id]
    async with engine.runtime.db.read() as connection:
        traits = await connection.scalar(select(leads.c.traits).where(leads.c.id == lead_id))
    assert (row.meta, row.google) == (
        row_text("meta", meta_row(traits, None)),
        row_text("google", google_row(traits, None)),
    )
    assert orjson.loads(row.meta)[:2] == [sha("ann@example.com"), sha("14155550100")]
    assert row.region == ""

    await mark_stored_rows(engine)
    assert (await meta(client))["data"] == [MARK]


async def test_rows_stored_for_other_traits_are_not_exported(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    await mark_stored_rows(engine)
    assert (await meta(client))["data"] == [MARK]

    # Traits changed behind the job's back (as any writer but the worker might):
    # the stored identifiers no longer match, and the export works the row out itself.
    async with engine.runtime.db.write() as connection:
        await connection.execute(update(leads).values(traits={"email": "ann@new.example"}))

    assert (await meta(client))["data"] == [[sha("ann@new.example"), "", "", "", "", "", "", ""]]


async def test_a_changed_identifier_is_sent_again_in_the_next_sync_from_rows_stored_anew(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    first = await all_pages(client)
    await mark_stored_rows(engine)

    await engine.send("identify", userId="ann", traits={"email": "ann@new.example"})
    await settle(engine)

    (lead_id,) = await stored(engine)
    assert orjson.loads((await stored(engine))[lead_id].meta)[0] == sha("ann@new.example")
    changes = await all_pages(client, cursor=first[-1]["next_cursor"])
    assert [(page["op"], page["data"]) for page in changes] == [
        ("add", [[sha("ann@new.example"), "", "", "", "", "", "", ""]])
    ]


async def test_a_trait_no_platform_matches_on_changes_no_row_and_numbers_nothing_again(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    first = await all_pages(client)
    await mark_stored_rows(engine)

    await engine.send("identify", userId="ann", traits={"plan": "pro", "email": "ann@example.com"})
    await settle(engine)

    assert (await meta(client))["data"] == [MARK]
    again = await meta(client, cursor=first[-1]["next_cursor"])
    assert again["data"] == []


async def test_rows_stored_for_another_region_are_not_used(engine: Engine) -> None:
    await join(engine, "ann", email="ann@example.com", phone="020 7946 0000")
    await mark_stored_rows(engine)

    async def exported(region: str | None) -> list[str]:
        async with engine.runtime.db.read() as connection:
            rows = await platform_rows(
                connection, "visitors", "meta", region, after=0, upto=10, limit=10, adds_only=True
            )
        return [orjson.loads(text) for _, _, text in rows]

    assert await exported(None) == [MARK]
    in_britain = await exported("GB")
    assert in_britain == [meta_row({"email": "ann@example.com", "phone": "020 7946 0000"}, "GB")]
    assert in_britain[0][1] == sha("442079460000")


async def test_a_traits_value_of_another_type_makes_the_stored_rows_stale(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com", zip="94107", country="US")
    assert (await google_csv(client)).splitlines()[1].endswith(",US,94107")
    await mark_stored_rows(engine)

    # The same digits as a number: Google's clear zip is text only, so the row changes.
    async with engine.runtime.db.write() as connection:
        await connection.execute(
            update(leads).values(traits={"email": "ann@example.com", "zip": 94107, "country": "US"})
        )

    assert (await meta(client))["data"] != [MARK]
    assert (await google_csv(client)).splitlines()[1].endswith(",US,")


async def test_starting_the_job_hashes_ahead_the_members_whose_rows_are_missing_or_stale(
    engine: Engine,
) -> None:
    for user_id in ("ann", "bob", "cat"):
        await join(engine, user_id, email=f"{user_id}@example.com", phone="020 7946 0000")
    before = await stored(engine)
    async with engine.runtime.db.write() as connection:
        await connection.execute(
            delete(audience_identities).where(audience_identities.c.lead_id == min(before))
        )

    # What the job's start does, in the background.
    await engine.runtime.audiences.stop()
    await engine.runtime.audiences.start()
    for _ in range(200):
        if len(await stored(engine)) == len(before):
            break
        await asyncio.sleep(0.05)
    assert await stored(engine) == before
    assert await refresh_all_identities(engine.runtime.db, None) == 0

    # Another default region: every row is worked out again, for it.
    assert await refresh_all_identities(engine.runtime.db, "GB") == 3
    in_britain = await stored(engine)
    assert {row.region for row in in_britain.values()} == {"GB"}
    assert {orjson.loads(row.meta)[1] for row in in_britain.values()} == {sha("442079460000")}


async def test_an_erased_lead_leaves_no_stored_rows(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    await join(engine, "bob", email="bob@example.com")
    ann = await lead_of(engine, "ann@example.com")

    answer = await client.delete(f"/v1/leads/{ann}")
    assert answer.status_code == 200, answer.text
    await settle(engine)

    assert set(await stored(engine)) == {await lead_of(engine, "bob@example.com")}


async def test_rows_worked_out_before_an_erasure_are_not_stored_after_it(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    await join(engine, "bob", email="bob@example.com")
    ann, bob = await lead_of(engine, "ann@example.com"), await lead_of(engine, "bob@example.com")
    async with engine.runtime.db.read() as connection:
        rows = [
            identity_row(lead_id, identifiers, traits, None)
            for lead_id, traits, identifiers in await connection.execute(
                select(leads.c.id, leads.c.traits, literal_column("'x'")).order_by(leads.c.id)
            )
        ]

    # Ann is erased between the read of her traits and the write of her rows.
    answer = await client.delete(f"/v1/leads/{ann}")
    assert answer.status_code == 200, answer.text
    async with engine.runtime.db.write() as connection:
        assert await store_identity_rows(connection, rows) == 1

    assert set(await stored(engine)) == {bob}


async def test_exports_read_from_stored_rows_equal_exports_worked_out_afresh(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    people = {
        "ann": {"email": " Ann@Example.com ", "phone": "+44 20 7946 0000", "country": "GB"},
        "bob": {"email": "bob@example.com", "first_name": "Bób", "zip": "94107-1234"},
        "cat": {"phone": 4155550100, "state": "New York", "country": "US", "zip": "10001"},
        "dan": {"email": ["not", "text"], "last_name": "O'Neil-Smith", "city": "São Paulo"},
        "eve": {"email": "eve@example.com", "zip": 'K1A, "0B1"', "country": "CA"},
    }
    for user_id, traits in people.items():
        await join(engine, user_id, **traits)
    assert len(await stored(engine)) == len(people)

    from_store = await all_pages(client), await google_csv(client)
    async with engine.runtime.db.write() as connection:
        await connection.execute(delete(audience_identities))
    afresh = await all_pages(client), await google_csv(client)

    assert [page["data"] for page in from_store[0]] == [page["data"] for page in afresh[0]]
    assert len(afresh[0][0]["data"]) == len(people)
    assert from_store[1] == afresh[1]
    assert 'CA,"K1A, ""0B1"""' in afresh[1]


_TRAIT = st.one_of(
    st.none(),
    st.text(max_size=12),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(),
    st.booleans(),
    st.lists(st.none(), max_size=1),
)
_TRAITS = st.dictionaries(st.sampled_from((*IDENTITY_TRAITS, "plan")), _TRAIT)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(
    first=_TRAITS,
    changes=_TRAITS,
    dropped=st.sets(st.sampled_from((*IDENTITY_TRAITS, "plan"))),
    region=st.sampled_from((None, "US", "GB")),
)
def test_traits_sqlite_extracts_alike_give_the_same_rows(
    first: dict[str, Any], changes: dict[str, Any], dropped: set[str], region: str | None
) -> None:
    """What the database extracts stands for what the rows are made from: when it is the
    same for two leads, so are their rows (the converse need not hold). The second lead
    is the first with some traits changed or dropped, so that both cases come up."""
    second = {name: value for name, value in (first | changes).items() if name not in dropped}
    database = sqlite3.connect(":memory:")
    database.execute("CREATE TABLE leads (id INTEGER, traits TEXT)")
    for number, traits in enumerate((first, second)):
        database.execute("INSERT INTO leads VALUES (?, ?)", (number, orjson.dumps(traits).decode()))
    query = f"SELECT {identifiers_sql('sqlite', 'leads')} FROM leads ORDER BY id"
    one, other = (value for (value,) in database.execute(query))
    if one == other:
        assert meta_row(first, region) == meta_row(second, region)
        assert google_row(first, region) == google_row(second, region)
