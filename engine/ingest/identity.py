"""Which lead each message belongs to: identity resolution inside the ingest transaction.

A person is seen under anonymous ids (one per browser) and user ids (once they sign
in). The `identities` table routes each id to one lead. Resolution reads every id of
a group in a couple of queries, applies the rules below in message order to a local
map (so a message sees the ids the messages before it mapped), and writes the new
leads and identities in two multi-row inserts.

Ingest never moves data between leads: when a message shows that two leads are one
person, its event carries `merge_lead_id` and the worker merges, in event order.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection, AsyncTransaction

from engine.db.database import SqlConnection
from engine.db.queries import insert_returning, micros, rows_for_ids
from engine.db.schema import identities, leads
from engine.ingest.messages import Message

USER = "user"
ANON = "anon"
Key = tuple[str, str]  # (USER | ANON, the id)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one message goes: its lead, and the lead it says is the same person."""

    lead_id: int
    merge_lead_id: int | None = None


class IdentityRace(RuntimeError):
    """An id of this group could not be mapped (another process mapped it, then it was
    erased); the group is refused, and retried by its callers."""


@dataclass
class IdentityPlan:
    """The rules applied to one group: pure data, before anything is written.

    Lead references below zero stand for leads still to be created (-1 the first).
    """

    routes: list[Route] = field(default_factory=list)
    new_leads: int = 0
    new_identities: dict[Key, int] = field(default_factory=dict)


def keys_of(message: Message) -> Iterator[Key]:
    """Every identity a message may look up."""
    if message.user_id is not None:
        yield (USER, message.user_id)
    if message.anonymous_id is not None:
        yield (ANON, message.anonymous_id)
    if message.previous_id is not None:
        yield (USER, message.previous_id)
        yield (ANON, message.previous_id)


IdsByKind = dict[str, list[str]]  # USER | ANON: the ids, sorted


def ids_to_look_up(messages: Sequence[Message]) -> IdsByKind:
    """Every id the messages may look up, by kind. It needs no database: the inbox works
    it out before its transaction, where on SQLite the worker waits for it."""
    keys = {key for message in messages for key in keys_of(message)}
    return {
        kind: sorted(value for key_kind, value in keys if key_kind == kind) for kind in (USER, ANON)
    }


def plan_routes(
    messages: Sequence[Message], known: Mapping[Key, int], identified: AbstractSet[int]
) -> IdentityPlan:
    """Apply the identity rules in message order.

    `known` maps the ids already stored to their leads; `identified` holds the leads
    among them that have a user id (an anonymous lead may be claimed by a user id,
    an identified one belongs to someone else).
    """
    planner = _Planner(known, identified)
    for message in messages:
        route = planner.alias(message) if message.type == "alias" else planner.route(message)
        planner.plan.routes.append(route)
    return planner.plan


class _Planner:
    def __init__(self, known: Mapping[Key, int], identified: AbstractSet[int]) -> None:
        self.plan = IdentityPlan()
        self._leads = dict(known)
        self._identified = set(identified)

    def route(self, message: Message) -> Route:
        anon = (ANON, message.anonymous_id) if message.anonymous_id is not None else None
        anon_lead = self._leads.get(anon) if anon is not None else None
        if message.user_id is None:
            if anon_lead is not None:
                return Route(anon_lead)
            assert anon is not None  # a message has a userId or an anonymousId
            return Route(self._new_lead(anon))

        user = (USER, message.user_id)
        user_lead = self._leads.get(user)
        if user_lead is None:
            if anon_lead is not None and anon_lead not in self._identified:
                # The anonymous visitor signs in: same lead, now identified.
                self._map(user, anon_lead)
                return Route(anon_lead)
            user_lead = self._new_lead(user)
        if anon is not None:
            if anon_lead is None:
                self._map(anon, user_lead)
            elif anon_lead != user_lead and anon_lead not in self._identified:
                # A known user on a browser that has its own anonymous lead: one person.
                return Route(user_lead, merge_lead_id=anon_lead)
        return Route(user_lead)

    def alias(self, message: Message) -> Route:
        """`previousId` is now `userId`: an explicit merge, even of identified leads."""
        assert message.user_id is not None and message.previous_id is not None
        user = (USER, message.user_id)
        previous_lead = self._leads.get((USER, message.previous_id))
        if previous_lead is None:
            previous_lead = self._leads.get((ANON, message.previous_id))
        user_lead = self._leads.get(user)
        if user_lead is None:
            if previous_lead is not None:
                # The new id joins the lead of the old one: nothing to merge.
                self._map(user, previous_lead)
                return Route(previous_lead)
            user_lead = self._new_lead(user)
        if previous_lead is None:
            self._map((USER, message.previous_id), user_lead)
            self._map((ANON, message.previous_id), user_lead)
        elif previous_lead != user_lead:
            return Route(user_lead, merge_lead_id=previous_lead)
        return Route(user_lead)

    def _new_lead(self, key: Key) -> int:
        self.plan.new_leads += 1
        lead = -self.plan.new_leads
        self._map(key, lead)
        return lead

    def _map(self, key: Key, lead: int) -> None:
        self._leads[key] = lead
        self.plan.new_identities[key] = lead
        if key[0] == USER:
            self._identified.add(lead)


async def resolve_leads(
    connection: SqlConnection,
    messages: Sequence[Message],
    now: datetime,
    ids: IdsByKind | None = None,
) -> list[Route]:
    """The route of each message, with new leads and identities written (not committed).
    `ids`: `ids_to_look_up(messages)`, if worked out already.

    On PostgreSQL other API processes may map some of the same ids between our read and
    our write. Our insert of such an id waits for their commit and skips it; then our
    inserts are rolled back to a savepoint and the group is planned again against the
    ids as they are now, which include every id that was taken from us. Each round
    thus learns at least one id for good, so the rounds end, however many processes
    keep mapping ids of the group: a fixed number of rounds gave up under that load.
    """
    if ids is None:
        ids = ids_to_look_up(messages)
    taken: set[Key] = set()
    while True:
        known = await select_known_identities(connection, ids)
        if not taken <= known.keys():
            # Mapped by another process and gone since: only an erasure deletes ids.
            raise IdentityRace("ids of this group were mapped and then erased meanwhile")
        identified = await select_identified_leads(
            connection, {lead for (kind, _), lead in known.items() if kind == ANON}
        )
        plan = plan_routes(messages, known, identified)
        if not plan.new_identities:
            return plan.routes
        savepoint = await _savepoint(connection)
        lead_ids = await insert_leads(connection, plan.new_leads, now)
        mapped = {key: _real(lead, lead_ids) for key, lead in plan.new_identities.items()}
        taken = await insert_identities(connection, mapped, now)
        if not taken:
            if savepoint is not None:
                await savepoint.commit()
            return [
                Route(
                    _real(route.lead_id, lead_ids),
                    None if route.merge_lead_id is None else _real(route.merge_lead_id, lead_ids),
                )
                for route in plan.routes
            ]
        if savepoint is None:
            raise IdentityRace("ids of this group were mapped by another writer of SQLite")
        await savepoint.rollback()


async def _savepoint(connection: SqlConnection) -> AsyncTransaction | None:
    """A savepoint to roll the group's inserts back to, where another writer may race us.

    On SQLite the transaction began with BEGIN IMMEDIATE, which no other writer gets
    past until it commits: nothing to guard against, and two statements saved.
    """
    if isinstance(connection, AsyncConnection) and connection.dialect.name != "sqlite":
        return await connection.begin_nested()
    return None


def _real(lead: int, new_lead_ids: Sequence[int]) -> int:
    return new_lead_ids[-lead - 1] if lead < 0 else lead


# --- the queries -------------------------------------------------------------------------------


# The queries run by every group the inbox writes: plain SQL to the driver, without
# SQLAlchemy building and rendering each statement on each call, which most of the
# lead resolution's Python time went to.


async def select_known_identities(connection: SqlConnection, ids: IdsByKind) -> dict[Key, int]:
    known: dict[Key, int] = {}
    for kind, values in ids.items():
        found = await rows_for_ids(
            connection,
            f"SELECT value, lead_id FROM {identities.name} WHERE kind = ? AND value IN ({{ids}})",
            (kind,),
            values,
            sql_type="text",
        )
        known.update(((kind, value), lead_id) for value, lead_id in found)
    return known


async def select_identified_leads(
    connection: SqlConnection, lead_ids: AbstractSet[int]
) -> set[int]:
    """The leads among these that have a user id.

    Asked by lead id alone, the kind tested here: SQLite, planning without statistics
    (cjm runs no ANALYZE), answered `kind = ? AND lead_id IN (...)` of five leads or
    more by walking the primary key through every user id there is, not the lead_id
    index through these leads' few ids. The walk grew with the table: at a million
    leads, it was most of what storing a group cost.
    """
    found = await rows_for_ids(
        connection,
        f"SELECT lead_id, kind FROM {identities.name} WHERE lead_id IN ({{ids}})",
        (),
        sorted(lead_ids),
    )
    return {lead_id for lead_id, kind in found if kind == USER}


LEAD_COLUMNS = ("created_at", "updated_at", "traits")
IDENTITY_COLUMNS = ("kind", "value", "lead_id", "created_at")


async def insert_leads(connection: SqlConnection, count: int, now: datetime) -> list[int]:
    """`count` new, empty leads; their ids (in no particular order: the rows are alike)."""
    at = micros(now)
    rows = await insert_returning(
        connection, leads, LEAD_COLUMNS, [(at, at, "{}")] * count, " RETURNING id"
    )
    return [lead_id for (lead_id,) in rows]


async def insert_identities(
    connection: SqlConnection, mapped: Mapping[Key, int], now: datetime
) -> set[Key]:
    """Map each id to its lead; the ids another process mapped first (not written).

    Rows go in key order so that two processes inserting overlapping ids take their
    locks in the same order and wait for each other instead of deadlocking.
    """
    at = micros(now)
    rows = [(kind, value, lead_id, at) for (kind, value), lead_id in sorted(mapped.items())]
    inserted = await insert_returning(
        connection,
        identities,
        IDENTITY_COLUMNS,
        rows,
        " ON CONFLICT (kind, value) DO NOTHING RETURNING kind, value",
    )
    return mapped.keys() - {(kind, value) for kind, value in inserted}
