"""Identity resolution: which lead each message belongs to, and when two leads are one person."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.clock import ManualClock
from engine.db.database import Database
from engine.db.schema import events, identities, leads
from engine.ingest import identity
from engine.ingest.identity import (
    ANON,
    USER,
    IdsByKind,
    Key,
    Route,
    plan_routes,
    resolve_leads,
)
from engine.ingest.inbox import Inbox
from engine.ingest.messages import Message, MessageType, parse_message
from tests.sqlite_plans import TracedSqlite

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def message(
    type_: MessageType = "track",
    *,
    user: str | None = None,
    anon: str | None = None,
    previous: str | None = None,
) -> Message:
    fields: dict[str, Any] = {"userId": user, "anonymousId": anon, "previousId": previous}
    return parse_message({**fields, "event": "x"}, type_, NOW)


def plan(
    *messages: Message, known: Mapping[Key, int] | None = None, identified: AbstractSet[int] = set()
) -> list[Route]:
    return plan_routes(messages, known or {}, identified).routes


# --- the rules, without a database ---------------------------------------------------------------


def test_an_unknown_anonymous_id_gets_a_new_lead() -> None:
    result = plan_routes([message(anon="a1")], {}, set())
    assert result.routes == [Route(-1)]
    assert result.new_leads == 1
    assert result.new_identities == {(ANON, "a1"): -1}


def test_messages_of_one_group_see_the_ids_mapped_before_them() -> None:
    routes = plan(message(anon="a1"), message("identify", user="u1", anon="a1"), message(user="u1"))
    assert routes == [Route(-1), Route(-1), Route(-1)]


def test_an_anonymous_visitor_who_identifies_keeps_the_same_lead() -> None:
    result = plan_routes([message("identify", user="u1", anon="a1")], {(ANON, "a1"): 7}, set())
    assert result.routes == [Route(7)]
    assert result.new_identities == {(USER, "u1"): 7}


def test_a_new_user_on_a_browser_of_another_identified_user_gets_a_new_lead() -> None:
    routes = plan(message(user="u2", anon="a1"), known={(ANON, "a1"): 7}, identified={7})
    assert routes == [Route(-1)]


def test_a_known_user_on_a_browser_with_its_own_anonymous_lead_asks_for_a_merge() -> None:
    routes = plan(message(user="u1", anon="a2"), known={(USER, "u1"): 7, (ANON, "a2"): 8})
    assert routes == [Route(7, merge_lead_id=8)]


def test_a_known_user_on_a_browser_of_another_identified_lead_is_not_merged() -> None:
    routes = plan(
        message(user="u1", anon="a2"), known={(USER, "u1"): 7, (ANON, "a2"): 8}, identified={7, 8}
    )
    assert routes == [Route(7)]


def test_a_known_user_maps_a_new_anonymous_id_to_its_lead() -> None:
    result = plan_routes([message(user="u1", anon="a9")], {(USER, "u1"): 7}, {7})
    assert result.routes == [Route(7)]
    assert result.new_identities == {(ANON, "a9"): 7}


def test_alias_merges_the_previous_lead_even_when_identified() -> None:
    routes = plan(
        message("alias", user="new", previous="old"),
        known={(USER, "new"): 7, (USER, "old"): 8},
        identified={7, 8},
    )
    assert routes == [Route(7, merge_lead_id=8)]


def test_alias_looks_the_previous_id_up_as_an_anonymous_id_too() -> None:
    routes = plan(
        message("alias", user="u1", previous="a1"), known={(USER, "u1"): 7, (ANON, "a1"): 8}
    )
    assert routes == [Route(7, merge_lead_id=8)]


def test_alias_of_an_unknown_previous_id_maps_it_both_ways_to_the_user() -> None:
    result = plan_routes([message("alias", user="u1", previous="p1")], {(USER, "u1"): 7}, {7})
    assert result.routes == [Route(7)]
    assert result.new_identities == {(USER, "p1"): 7, (ANON, "p1"): 7}


def test_alias_of_a_new_user_id_joins_the_previous_lead() -> None:
    result = plan_routes([message("alias", user="u2", previous="u1")], {(USER, "u1"): 7}, {7})
    assert result.routes == [Route(7)]
    assert result.new_identities == {(USER, "u2"): 7}


# --- against the database, through the inbox -----------------------------------------------------


@pytest.fixture
async def inbox(db: Database) -> Any:
    inbox = Inbox(db, ManualClock(NOW))
    await inbox.start()
    yield inbox
    await inbox.stop()


async def stored(db: Database) -> list[tuple[str, int, int | None]]:
    async with db.read() as connection:
        rows = await connection.execute(
            select(events.c.message_id, events.c.lead_id, events.c.merge_lead_id).order_by(
                events.c.id
            )
        )
        return [tuple(row) for row in rows]  # type: ignore[misc]


async def lead_count(db: Database) -> int:
    async with db.read() as connection:
        return int((await connection.execute(select(func.count()).select_from(leads))).scalar_one())


def call(type_: MessageType, message_id: str, **fields: Any) -> Message:
    return parse_message({"messageId": message_id, "event": "x", **fields}, type_, NOW)


async def test_anonymous_visit_then_identify_keeps_one_lead(db: Database, inbox: Inbox) -> None:
    await inbox.accept([call("page", "m1", anonymousId="a1")])
    await inbox.accept([call("identify", "m2", anonymousId="a1", userId="u1")])
    await inbox.accept([call("track", "m3", userId="u1")])
    (_, lead, _), *rest = await stored(db)
    assert rest == [("m2", lead, None), ("m3", lead, None)]
    assert await lead_count(db) == 1


async def test_a_user_seen_on_a_second_anonymous_lead_is_marked_for_merge(
    db: Database, inbox: Inbox
) -> None:
    await inbox.accept([call("identify", "m1", anonymousId="laptop", userId="u1")])
    await inbox.accept([call("page", "m2", anonymousId="phone")])
    await inbox.accept([call("identify", "m3", anonymousId="phone", userId="u1")])
    (_, laptop_lead, _), (_, phone_lead, _), third = await stored(db)
    assert laptop_lead != phone_lead
    assert third == ("m3", laptop_lead, phone_lead)


async def test_alias_marks_the_previous_lead_for_merge(db: Database, inbox: Inbox) -> None:
    await inbox.accept([call("identify", "m1", userId="old")])
    await inbox.accept([call("identify", "m2", userId="new")])
    await inbox.accept([call("alias", "m3", previousId="old", userId="new")])
    (_, old_lead, _), (_, new_lead, _), alias = await stored(db)
    assert alias == ("m3", new_lead, old_lead)


async def test_new_leads_are_created_empty_at_the_inbox_time(db: Database, inbox: Inbox) -> None:
    await inbox.accept([call("page", "m1", anonymousId="a1")])
    async with db.read() as connection:
        lead = (await connection.execute(select(leads))).one()
        mapping = (await connection.execute(select(identities))).one()
    assert (lead.created_at, lead.updated_at, lead.traits, lead.merged_into) == (NOW, NOW, {}, None)
    assert (mapping.kind, mapping.value, mapping.lead_id) == (ANON, "a1", lead.id)


# PostgreSQL only: on SQLite the group's transaction began with BEGIN IMMEDIATE, and no
# other process can map an id before it commits.
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_an_id_mapped_by_another_process_meanwhile_is_replanned_to_its_lead(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with db.write() as connection:
        winner = (await identity.insert_leads(connection, 1, NOW))[0]
        await identity.insert_identities(connection, {(ANON, "a1"): winner}, NOW)
    real_select = identity.select_known_identities
    reads: list[int] = []

    async def stale_first(connection: AsyncConnection, ids: IdsByKind) -> dict[Key, int]:
        reads.append(1)
        # The first read predates the other process's commit.
        return {} if len(reads) == 1 else await real_select(connection, ids)

    monkeypatch.setattr(identity, "select_known_identities", stale_first)
    async with db.write() as connection:
        routes = await resolve_leads(connection, [call("page", "m1", anonymousId="a1")], NOW)
    assert routes == [Route(winner)]
    assert len(reads) == 2
    assert await lead_count(db) == 1


async def test_processes_ingesting_the_same_new_ids_at_once_map_each_to_one_lead(
    database_url: str, db: Database
) -> None:
    """Four API processes (a database handle each, so connections of their own) store
    groups of new ids drawn from one pool at the same time: each id ends mapped to one
    lead, every message routed to it, and no lead is left without an id."""
    processes, groups, group_size, pool = 4, 12, 300, 2_000
    handles = [Database(database_url) for _ in range(processes)]
    inboxes = [Inbox(handle, ManualClock(NOW)) for handle in handles]
    rng = random.Random(6)
    sent = [
        [
            [
                call("page", f"p{p}-g{g}-m{m}", anonymousId=f"a{rng.randrange(pool)}")
                for m in range(group_size)
            ]
            for g in range(groups)
        ]
        for p in range(processes)
    ]

    async def stream(inbox: Inbox, its_groups: list[list[Message]]) -> None:
        for group in its_groups:
            await inbox.accept(group)

    try:
        for inbox in inboxes:
            await inbox.start()
        await asyncio.gather(
            *(stream(inbox, its) for inbox, its in zip(inboxes, sent, strict=True))
        )
    finally:
        for inbox in inboxes:
            await inbox.stop()
        for handle in handles:
            await handle.close()
    async with db.read() as connection:
        mapped = dict(
            (await connection.execute(select(identities.c.value, identities.c.lead_id))).all()
        )
        routed = (await connection.execute(select(events.c.anonymous_id, events.c.lead_id))).all()
        lead_ids = set((await connection.execute(select(leads.c.id))).scalars())
    ids = {m.anonymous_id for its in sent for group in its for m in group}
    assert set(mapped) == ids
    assert len(routed) == processes * groups * group_size
    assert all(lead == mapped[anon] for anon, lead in routed)
    assert lead_ids == set(mapped.values())


async def test_on_sqlite_storing_a_group_searches_identities_by_their_whole_key(
    sqlite_template: Path, tmp_path: Path
) -> None:
    """SQLite plans without statistics. It answered a lookup of a few leads' user ids
    by walking every user id in the table (the primary key's prefix `kind`), a cost
    that grew with the table: at a million leads, most of what storing a group took.
    Every query the inbox makes on identities must search an index by its whole key."""
    async with TracedSqlite(sqlite_template, tmp_path) as traced:
        inbox = Inbox(traced.db, ManualClock(NOW))
        async with traced.db.write() as connection:
            await traced.trace(connection)
        await inbox.start()
        try:
            # Groups of ten: from five ids on, SQLite chose the walk.
            await inbox.accept([message("page", anon=f"a{n}") for n in range(10)])
            await inbox.accept([message("identify", user=f"u{n}", anon=f"a{n}") for n in range(10)])
            await inbox.accept([message(user=f"u{n}") for n in range(10)])
        finally:
            await inbox.stop()

    lookups = traced.selects("identities")
    assert len(lookups) >= 5, traced.statements  # ids by value, then leads' user ids, per group
    for lookup in lookups:
        steps = traced.plan(lookup)
        on_identities = [step for step in steps if " identities " in f"{step} "]
        assert on_identities, (lookup, steps)
        for step in on_identities:
            assert step.startswith("SEARCH identities USING "), (lookup, steps)
            assert step.endswith(("(kind=? AND value=?)", "(lead_id=?)")), (lookup, steps)
