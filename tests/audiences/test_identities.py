"""Identifiers hashed ahead of the exports: stored by the audience job, read by exports
while they hold for the lead's traits and the region, worked out afresh when not, and
sent again in the next sync when a member's identifiers change."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, select, update

from channels.audiences.identities import exported_row, identity_digest, identity_rows
from channels.audiences.normalize import google_row, meta_row
from channels.audiences.store import Member
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


async def stored(engine: Engine) -> dict[int, tuple[str, dict[str, list[str]]]]:
    async with engine.runtime.db.read() as connection:
        rows = await connection.execute(select(audience_identities))
        return {row.lead_id: (row.digest, row.rows) for row in rows}


async def lead_of(engine: Engine, email: str) -> int:
    async with engine.runtime.db.read() as connection:
        lead_id = await connection.scalar(select(leads.c.id).where(leads.c.email == email))
    assert lead_id is not None
    return int(lead_id)


async def mark_stored_rows(engine: Engine) -> None:
    """Every stored Meta row replaced by a marker, to see which rows an export reads."""
    async with engine.runtime.db.write() as connection:
        for lead_id, (_, rows) in (await stored(engine)).items():
            await connection.execute(
                update(audience_identities)
                .where(audience_identities.c.lead_id == lead_id)
                .values(rows=rows | {"meta": MARK})
            )


async def test_the_audience_job_stores_each_members_rows_and_exports_read_them(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="Ann@Example.com", phone="+1 415 555 0100", city="Köln")
    lead_id = await lead_of(engine, "ann@example.com")

    digest, rows = (await stored(engine))[lead_id]
    async with engine.runtime.db.read() as connection:
        traits = await connection.scalar(select(leads.c.traits).where(leads.c.id == lead_id))
    assert digest == identity_digest(traits, None)
    assert rows == {"meta": meta_row(traits, None), "google": google_row(traits, None)}
    assert rows["meta"][:2] == [sha("ann@example.com"), sha("14155550100")]

    await mark_stored_rows(engine)
    assert (await meta(client))["data"] == [MARK]


async def test_rows_stored_for_other_traits_are_not_exported(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    await join(engine, "ann", email="ann@example.com")
    await mark_stored_rows(engine)
    assert (await meta(client))["data"] == [MARK]

    # Traits changed behind the job's back (as any writer but the worker might):
    # the digest no longer matches, and the export works the row out itself.
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
    assert (await stored(engine))[lead_id][1]["meta"][0] == sha("ann@new.example")
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
    lead_id = await lead_of(engine, "ann@example.com")
    digest, rows = (await stored(engine))[lead_id]
    traits = {"email": "ann@example.com", "phone": "020 7946 0000"}
    member = Member(1, "add", lead_id, traits, None, None, None, rows, digest)  # type: ignore[arg-type]

    assert exported_row(member, "meta", None) == MARK
    in_britain = exported_row(member, "meta", "GB")
    assert in_britain == meta_row(traits, "GB")
    assert in_britain[1] == sha("442079460000")


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


async def test_exports_read_from_stored_rows_equal_exports_worked_out_afresh(
    engine: Engine, client: httpx.AsyncClient
) -> None:
    people = {
        "ann": {"email": " Ann@Example.com ", "phone": "+44 20 7946 0000", "country": "GB"},
        "bob": {"email": "bob@example.com", "first_name": "Bób", "zip": "94107-1234"},
        "cat": {"phone": 4155550100, "state": "New York", "country": "US", "zip": "10001"},
        "dan": {"email": ["not", "text"], "last_name": "O'Neil-Smith", "city": "São Paulo"},
    }
    for user_id, traits in people.items():
        await join(engine, user_id, **traits)
    assert len(await stored(engine)) == len(people)

    from_store = await all_pages(client)
    async with engine.runtime.db.write() as connection:
        await connection.execute(delete(audience_identities))
    afresh = await all_pages(client)

    assert [page["data"] for page in from_store] == [page["data"] for page in afresh]
    assert len(afresh[0]["data"]) == len(people)


_TRAIT = st.one_of(st.none(), st.text(max_size=12), st.integers(), st.booleans())


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    first=st.dictionaries(st.sampled_from((*IDENTITY_TRAITS, "plan")), _TRAIT),
    second=st.dictionaries(st.sampled_from((*IDENTITY_TRAITS, "plan")), _TRAIT),
    region=st.sampled_from((None, "US", "GB")),
)
def test_traits_with_one_digest_give_the_same_rows(
    first: dict[str, Any], second: dict[str, Any], region: str | None
) -> None:
    """The digest stands for what the rows are made from: when two leads' digests agree,
    so do their rows (the converse need not hold)."""
    if identity_digest(first, region) == identity_digest(second, region):
        assert identity_rows(first, region) == identity_rows(second, region)
    assert identity_digest(first, region) != identity_digest(first, "FR")
