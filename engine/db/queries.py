"""The engine's queries, named and kept together: the database contract in one place.

Every function takes an open connection inside the caller's transaction. Claims lock
`leads` rows with `FOR UPDATE SKIP LOCKED` on PostgreSQL, so any number of workers
share the load and a lead is processed by one transaction at a time; the lock is
released by the commit, or by the database when a worker dies. SQLite renders no
locking clause: there the writer connection's `BEGIN IMMEDIATE` serializes all work.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Collection, Iterator, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

import orjson
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Select,
    Table,
    any_,
    bindparam,
    func,
    select,
    text,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.dialects.postgresql.base import PGDialect
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db.database import SqlConnection, SqlResult
from engine.db.schema import (
    audience_members,
    emails,
    enrollments,
    events,
    goals,
    identities,
    leads,
    offer_codes,
    outbox,
    sequence_runs,
    timers,
    transitions,
)
from engine.db.types import from_micros, to_micros

# Candidate leads are read from a window of the oldest pending work this many times
# larger than the claim, so that workers skipping each other's locked leads still fill
# their batch.
WINDOW_FACTOR = 4
# An outbox row waits as `pending` until its channel takes it over.
OUTBOX_PENDING, OUTBOX_DISPATCHED = "pending", "dispatched"
# Bound on bound parameters in one IN list (SQLite allows 32,766).
CHUNK = 5_000


def chunks(values: Sequence[Any], size: int = CHUNK) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), size):
        yield values[start : start + size]


def upsert(connection: AsyncConnection, table: Any) -> postgresql.Insert | sqlite.Insert:
    """An INSERT that supports ON CONFLICT on both databases."""
    if connection.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


# --- rows straight to the driver ----------------------------------------------------------------
#
# The worker writes thousands of rows per batch. Built as SQLAlchemy statements, each row
# costs its parameter processing in Python; the hot writes below are plain SQL run by the
# driver on rows made tuples once, with the column types' conversions done here: an
# instant as integer microseconds (as `Instant` stores it), JSON as the same text the
# engine's serializer gives. What is stored, and read back, is the same either way.


@lru_cache(maxsize=256)
def _in_driver_style(dialect: str, statement: str) -> str:
    if dialect != "postgresql":
        return statement  # qmark: sqlite3's own style
    numbers = iter(range(1, 10_000))
    return re.sub(r"\?", lambda _: f"${next(numbers)}", statement)


def driver_sql(connection: SqlConnection, statement: str) -> str:
    """`statement`, written with `?` placeholders, in the driver's parameter style."""
    return _in_driver_style(connection.dialect.name, statement)


async def execute_rows(
    connection: SqlConnection, statement: str, rows: Sequence[tuple[Any, ...]]
) -> None:
    """Run `statement` (`?` placeholders) once per row, in one executemany."""
    if rows:
        await connection.exec_driver_sql(driver_sql(connection, statement), list(rows))


# On PostgreSQL the bulk writes below take each column as one array parameter, typed
# as the column is: this names the type.
_POSTGRESQL = PGDialect()  # type: ignore[no-untyped-call]


def _arrays(table: Table, columns: Sequence[str]) -> str:
    """`unnest`'s arguments for `columns` of `table`: `$1::BIGINT[], $2::VARCHAR(64)[]`..."""
    return ", ".join(
        f"${number}::{table.c[name].type.compile(dialect=_POSTGRESQL)}[]"
        for number, name in enumerate(columns, start=1)
    )


async def _execute_for_rows(
    connection: SqlConnection, statement: str, rows: Sequence[tuple[Any, ...]]
) -> None:
    """On PostgreSQL `statement` takes the rows' columns as arrays, in one execution; on
    SQLite it is executed once per row, in one executemany."""
    if connection.dialect.name == "postgresql":
        columns = tuple(list(column) for column in zip(*rows, strict=True))
        await connection.exec_driver_sql(statement, columns)
    else:
        await connection.exec_driver_sql(statement, list(rows))


@lru_cache(maxsize=64)
def _insert_statement(dialect: str, table: Table, columns: tuple[str, ...], suffix: str) -> str:
    names = ", ".join(columns)
    if dialect == "postgresql":
        rows = f"SELECT * FROM unnest({_arrays(table, columns)})"
    else:
        rows = f"VALUES ({','.join('?' * len(columns))})"
    return f"INSERT INTO {table.name} ({names}) {rows}{suffix}"


async def insert_rows(
    connection: SqlConnection,
    table: Table,
    columns: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
    suffix: str = "",
) -> None:
    """`rows`, tuples of values in the order of `columns` as the driver takes them, into
    `table`, with `suffix` (an ON CONFLICT clause) after the rows.

    On PostgreSQL rows without a `suffix` go in by binary COPY (`_copy_rows`); the others
    in one statement that takes each column as an array (`unnest`): an executemany
    executes once per row, and spent about twice the server's CPU per row (24 against
    11 µs, inserting history). One statement may not update a row twice, so rows an
    ON CONFLICT ... DO UPDATE could meet twice must be merged before. On SQLite, in the
    process, an executemany is as cheap.
    """
    if not rows:
        return
    if not suffix and await _copy_rows(connection, table, columns, rows):
        return
    statement = _insert_statement(connection.dialect.name, table, columns, suffix)
    await _execute_for_rows(connection, statement, rows)


async def _copy_rows(
    connection: SqlConnection,
    table: Table,
    columns: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
) -> bool:
    """`rows` into `table` by PostgreSQL's binary COPY, in the connection's transaction;
    False where that cannot be (SQLite, or no transaction begun on the server yet: COPY
    would commit on its own).

    The driver encodes COPY's rows in its compiled code, where the arrays of `unnest`
    cost a Python-level type check per value (a quarter of the worker's time in the
    driver), and the server reads them without building and unnesting arrays.
    """
    if not isinstance(connection, AsyncConnection) or connection.dialect.name != "postgresql":
        return False
    driver = (await connection.get_raw_connection()).driver_connection
    if driver is None or not driver.is_in_transaction():
        return False
    await driver.copy_records_to_table(table.name, records=rows, columns=columns)
    return True


@lru_cache(maxsize=64)
def _update_statement(
    dialect: str,
    table: Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    also: str,
    where: str,
) -> str:
    if dialect == "postgresql":
        # The rows' columns are named _1, _2 ... so that `where` can name the table's own
        # without qualifying them.
        names = [f"_{number}" for number in range(1, len(columns) + len(keys) + 1)]
        values = [f"v.{name}" for name in names]
        rows = f" FROM unnest({_arrays(table, (*columns, *keys))}) AS v({', '.join(names)})"
        keyed = [f"{table.name}.{name}" for name in keys]
    else:
        values, rows, keyed = ["?"] * (len(columns) + len(keys)), "", list(keys)
    assigned = [f"{name} = {value}" for name, value in zip(columns, values, strict=False)]
    matched = [
        f"{name} = {value}" for name, value in zip(keyed, values[len(columns) :], strict=True)
    ]
    return (
        f"UPDATE {table.name} SET {', '.join([*assigned, *([also] if also else [])])}{rows}"
        f" WHERE {' AND '.join([*matched, *([where] if where else [])])}"
    )


async def update_rows(
    connection: SqlConnection,
    table: Table,
    columns: tuple[str, ...],
    keys: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
    *,
    also: str = "",
    where: str = "",
) -> None:
    """Set `columns` of the `table` row matched by `keys`, for each of `rows`: tuples of
    the values of `columns`, then of `keys`, as the driver takes them. `also` adds
    assignments of constants (`seq = NULL`), `where` conditions on the table's row.

    One statement on PostgreSQL, an executemany on SQLite, as `insert_rows`. The rows
    must match distinct table rows: PostgreSQL updates a row matched twice only once.
    """
    if rows:
        statement = _update_statement(connection.dialect.name, table, columns, keys, also, where)
        await _execute_for_rows(connection, statement, rows)


def in_list(
    connection: SqlConnection, values: Sequence[Any], sql_type: str = "bigint"
) -> tuple[str, tuple[Any, ...]]:
    """The list of an IN (`column IN (<this>)`) holding `values`, as driver SQL with its
    parameters: on PostgreSQL one array parameter of `sql_type` (one prepared statement
    whatever the count), on SQLite a placeholder each."""
    if connection.dialect.name == "postgresql":
        return f"SELECT unnest(?::{sql_type}[])", (list(values),)
    return ",".join("?" * len(values)), tuple(values)


def among_list(
    connection: SqlConnection, values: Sequence[Any], sql_type: str = "bigint"
) -> tuple[str, tuple[Any, ...]]:
    """What follows a column to say it holds one of `values` (`id <this>`), as driver SQL
    with its parameters, as `among` writes it: on PostgreSQL `= ANY(?::bigint[])`, on
    SQLite `IN (?, ...)`.

    On PostgreSQL, `IN (SELECT unnest(...))` is a join, which the planner may order
    either way; `= ANY` is met by searching an index on the column for each value, or
    tested on each row of another path. Use it where the join, planned on stale
    statistics, would walk a partial index: for the pending events, statistics
    gathered while few were pending made every batch walk all of them in the next
    burst. Not everywhere: where the planner believes another path small (the prefix
    `kind` of a never analyzed identities table), it tests `= ANY` on each of that
    path's rows, far more slowly than the join matches them (bench/README.md).
    """
    if connection.dialect.name == "postgresql":
        return f"= ANY(?::{sql_type}[])", (list(values),)
    return f"IN ({','.join('?' * len(values))})", tuple(values)


def micros(moment: datetime | None) -> int | None:
    """An instant as `Instant` stores it."""
    if moment is None:
        return None
    if moment.tzinfo is None:
        raise ValueError("naive datetime given to an Instant column")
    return to_micros(moment)


def json_text(value: Any) -> str:
    """A JSON column's value as the engine's serializer writes it."""
    return orjson.dumps(value).decode()


async def _per_chunk(
    connection: SqlConnection,
    statement: str,
    head: Sequence[Any],
    ids: Sequence[Any],
    tail: Sequence[Any] = (),
    sql_type: str = "bigint",
) -> AsyncIterator[SqlResult]:
    """Run `statement` (`?` placeholders) for `ids` (of `sql_type`) in chunks, with the
    parameters `head` before the list and `tail` after it. The statement names the
    list either as `{ids}`, the list of an IN (`in_list`), or as `{among}`, all that
    follows the column (`among_list`)."""
    listing = among_list if "{among}" in statement else in_list
    for part in chunks(ids):
        listed, parameters = listing(connection, part, sql_type)
        yield await connection.exec_driver_sql(
            driver_sql(connection, statement.format(ids=listed, among=listed)),
            (*head, *parameters, *tail),
        )


async def execute_for_ids(
    connection: SqlConnection, statement: str, head: Sequence[Any], ids: Sequence[int]
) -> int:
    """`_per_chunk` for a statement that changes rows: how many it changed."""
    return sum([result.rowcount async for result in _per_chunk(connection, statement, head, ids)])


async def rows_for_ids(
    connection: SqlConnection,
    statement: str,
    head: Sequence[Any],
    ids: Sequence[Any],
    tail: Sequence[Any] = (),
    sql_type: str = "bigint",
) -> list[tuple[Any, ...]]:
    """`_per_chunk` for a query: its rows (tuples, as SQLAlchemy rows are)."""
    rows: list[tuple[Any, ...]] = []
    async for result in _per_chunk(connection, statement, head, ids, tail, sql_type):
        rows.extend(result.fetchall())
    return rows


# Rows of one multi-row INSERT on SQLite: a few parameters each, well within its bound
# on the parameters of a statement.
ROWS_PER_INSERT = 1_000


async def reserve_ids(connection: SqlConnection, table: Table, count: int) -> list[int]:
    """`count` new values of `table`'s serial `id`, ascending (PostgreSQL only): ids
    to write explicitly when the rows must be inserted in another order than the one
    their ids should keep."""
    result = await connection.exec_driver_sql(
        # The sequence's name looked up once (a subquery), not once per value.
        f"SELECT nextval((SELECT pg_get_serial_sequence('{table.name}', 'id')))"
        " FROM generate_series(1, $1::INTEGER)",
        (count,),
    )
    return sorted(reserved for (reserved,) in result.fetchall())


async def insert_returning(
    connection: SqlConnection,
    table: Table,
    columns: tuple[str, ...],
    rows: Sequence[tuple[Any, ...]],
    suffix: str,
) -> list[tuple[Any, ...]]:
    """`insert_rows` with a `suffix` that ends in RETURNING: the rows returned, in no
    promised order.

    On PostgreSQL one statement takes the columns as arrays, as `insert_rows` does: the
    same text whatever the count, so prepared once, where a VALUES list of the group's
    length was parsed and planned anew for each group. On SQLite, multi-row INSERTs of
    ROWS_PER_INSERT rows, where an executemany with RETURNING would take one per row.
    """
    if not rows:
        return []
    if connection.dialect.name == "postgresql":
        statement = _insert_statement("postgresql", table, columns, suffix)
        columns_of_rows = tuple(list(column) for column in zip(*rows, strict=True))
        return list((await connection.exec_driver_sql(statement, columns_of_rows)).fetchall())
    head = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES "
    row = f"({','.join('?' * len(columns))})"
    returned: list[tuple[Any, ...]] = []
    for part in chunks(rows, ROWS_PER_INSERT):
        result = await connection.exec_driver_sql(
            head + ", ".join([row] * len(part)) + suffix,
            tuple(value for values in part for value in values),
        )
        returned.extend(result.fetchall())
    return returned


def among(connection: AsyncConnection, column: Any, ids: Collection[int]) -> ColumnElement[bool]:
    """`column IN ids`. On PostgreSQL `column = ANY(array)`: one parameter, so one
    prepared statement whatever the count, and no bound value rendered per id."""
    if connection.dialect.name == "postgresql":
        array = bindparam(None, list(ids), type_=postgresql.ARRAY(BigInteger))
        return column == any_(array)  # type: ignore[no-any-return]
    return column.in_(bindparam(None, list(ids), expanding=True))  # type: ignore[no-any-return]


# --- claims --------------------------------------------------------------------------------------


# The idle polls below are ordered by their index's key: the planner then reads that
# index whatever its statistics say. Without the order, PostgreSQL planned on statistics
# from when most events were pending would scan the table for one, past every row
# processed since (20-30 ms a poll on 100,000 events). Built once: building a statement
# anew cost about as much CPU as SQLite took to run it.
_ANY_PENDING_EVENT = (
    select(events.c.id).where(events.c.processed_at.is_(None)).order_by(events.c.id).limit(1)
)
_ANY_DUE_TIMER = (
    select(timers.c.id)
    .where(timers.c.due_at <= bindparam("now"))
    .order_by(timers.c.due_at)
    .limit(1)
)


async def any_pending_events(connection: AsyncConnection) -> bool:
    return await connection.scalar(_ANY_PENDING_EVENT) is not None


async def any_due_timers(connection: AsyncConnection, now: datetime) -> bool:
    return await connection.scalar(_ANY_DUE_TIMER, {"now": now}) is not None


# The claims, as plain SQL: the worker runs its batch's claim in its one trip to
# SQLite's thread with the loads (`Processor._load`), where through SQLAlchemy it took
# a trip of its own, about 0.2 ms of CPU on every batch.


async def claim_leads_with_events(connection: SqlConnection, limit: int) -> list[int]:
    return await _lock_leads(
        connection,
        "SELECT lead_id FROM events WHERE processed_at IS NULL ORDER BY id",
        (),
        limit,
    )


async def claim_leads_with_due_timers(
    connection: SqlConnection, now: datetime, limit: int
) -> list[int]:
    return await _lock_leads(
        connection,
        "SELECT lead_id FROM timers WHERE due_at <= ? ORDER BY due_at",
        (micros(now),),
        limit,
    )


async def claim_leads_on_old_versions(
    connection: SqlConnection, journey_id: str, version: int, stages: Sequence[str], limit: int
) -> list[int]:
    """Leads active on an older version of the journey, in a stage the current one has."""
    listed, listed_stages = in_list(connection, stages, sql_type="text")
    return await _lock_leads(
        connection,
        "SELECT lead_id FROM enrollments WHERE journey_id = ? AND state = 'active'"
        f" AND version != ? AND stage IN ({listed})",
        (journey_id, version, *listed_stages),
        limit,
    )


async def _lock_leads(
    connection: SqlConnection, window: str, parameters: Sequence[Any], limit: int
) -> list[int]:
    """Lock up to `limit` leads among those the query `window` names (in its order,
    the first `limit` * WINDOW_FACTOR of them), skipping leads other workers hold."""
    statement = f"SELECT id FROM leads WHERE id IN ({window} LIMIT ?) LIMIT ?"
    if connection.dialect.name == "postgresql":
        statement += " FOR UPDATE SKIP LOCKED"
    result = await connection.exec_driver_sql(
        driver_sql(connection, statement), (*parameters, limit * WINDOW_FACTOR, limit)
    )
    return [lead_id for (lead_id,) in result.fetchall()]


async def lock_live_lead(connection: AsyncConnection, lead_id: int) -> int | None:
    """Lock the lead that `lead_id` is now (following merges), unless another worker
    holds it: then None. A lead this transaction already holds is returned as is.

    `merged_into` is read by the locking statement itself, so a merge committed by
    another worker just before cannot be missed.
    """
    while True:
        row = (
            await connection.execute(
                select(leads.c.id, leads.c.merged_into)
                .where(leads.c.id == lead_id)
                .with_for_update(skip_locked=True)
            )
        ).first()
        if row is None:
            return None
        if row.merged_into is None:
            return int(row.id)
        lead_id = row.merged_into


# A merge chain longer than this is a bug, not data.
MAX_MERGE_DEPTH = 16


async def select_survivors(
    connection: AsyncConnection,
    lead_ids: Collection[int],
    columns: Sequence[ColumnElement[Any]] | None = None,
) -> dict[int, Any]:
    """For each id, the lead that survives it: itself, or the end of its `merged_into` chain.

    Unknown ids are left out. One query per level of merging, usually one in all. The
    rows hold every column of `leads`, or only `columns` besides `id` and `merged_into`
    (each column read costs its conversion, per row).
    """
    statement = (
        select(leads) if columns is None else select(leads.c.id, leads.c.merged_into, *columns)
    )
    rows: dict[int, Any] = {}
    wanted = set(lead_ids)
    for _ in range(MAX_MERGE_DEPTH):
        if not wanted:
            break
        result = await connection.execute(statement.where(among(connection, leads.c.id, wanted)))
        rows.update((row.id, row) for row in result)
        wanted = {
            row.merged_into
            for row in rows.values()
            if row.merged_into is not None and row.merged_into not in rows
        }
    survivors: dict[int, Any] = {}
    for lead_id in lead_ids:
        row = rows.get(lead_id)
        for _ in range(MAX_MERGE_DEPTH):
            if row is None or row.merged_into is None:
                break
            row = rows.get(row.merged_into)
        if row is not None and row.merged_into is None:
            survivors[lead_id] = row
    return survivors


# --- loading a batch -----------------------------------------------------------------------------


# The batch's rows, read as plain SQL to the driver and made named tuples once: built
# and read through SQLAlchemy, each row paid for its result processing and each field
# for a look-up by name, in the worker's hottest loop. Instants come back as datetimes
# (`Instant`'s conversion done here), JSON decoded, except where a field says otherwise.


class LeadRow(NamedTuple):
    id: int
    traits: dict[str, Any]
    watermark: datetime | None
    merged_into: int | None
    first_source: str | None
    first_source_at: datetime | None


class EventRow(NamedTuple):
    id: int
    lead_id: int
    name: str
    timestamp: datetime
    message_id: str
    data: dict[str, Any]  # properties, context, traits, previous_id


class DueTimerRow(NamedTuple):
    id: int
    lead_id: int
    due_at: datetime
    stage: str
    epoch: int
    transition: int
    journey_id: str
    entry_no: int


class EnrollmentRow(NamedTuple):
    """An enrollment as stored, instants left as integer microseconds: most rows a batch
    reads are only ranked (the latest run per journey), and only those are converted."""

    id: int
    lead_id: int
    journey_id: str
    version: int
    entry_no: int
    stage: str
    state: str
    epoch: int
    entered_at: int
    stage_entered_at: int
    ended_at: int | None
    sequences: list[str]


def instant(value: int | None) -> datetime | None:
    """A nullable `Instant` column's value as read through the driver."""
    return None if value is None else from_micros(value)


def json_value(value: Any) -> Any:
    """A JSON column's value as the driver gives it: text on SQLite, decoded already on
    PostgreSQL (SQLAlchemy's asyncpg dialect registers a JSON codec on the connection)."""
    return orjson.loads(value) if isinstance(value, str | bytes) else value


async def load_leads(connection: SqlConnection, lead_ids: Sequence[int]) -> list[LeadRow]:
    rows = await rows_for_ids(
        connection,
        "SELECT id, traits, watermark, merged_into, first_source, first_source_at"
        " FROM leads WHERE id IN ({ids})",
        (),
        lead_ids,
    )
    return [
        LeadRow(
            lead_id,
            json_value(traits) or {},
            instant(watermark),
            merged_into,
            first_source,
            instant(first_source_at),
        )
        for lead_id, traits, watermark, merged_into, first_source, first_source_at in rows
    ]


# "Not processed yet" for a query about given leads' events, written so that it does
# not match `ix_events_pending`'s condition (`processed_at IS NULL`): that index cannot
# serve it, and the query is answered through the leads' own events. PostgreSQL planned
# on statistics from a quiet moment believes that index holds a handful of rows, and
# walked all of it (every pending event: 92,000 in a burst) once per batch or per lead.
STILL_PENDING = "(processed_at IS NULL) IS NOT FALSE"


async def load_pending_events(
    connection: SqlConnection, lead_ids: Sequence[int], limit: int
) -> list[EventRow]:
    """Pending events of the leads, each lead's in timestamp then arrival order, at most
    `limit` in all."""
    rows: list[tuple[Any, ...]] = []
    for part in chunks(lead_ids):
        rows += await rows_for_ids(
            connection,
            "SELECT id, lead_id, name, timestamp, message_id, data FROM events"
            f" WHERE lead_id {{among}} AND {STILL_PENDING}"
            " ORDER BY lead_id, timestamp, id LIMIT ?",
            (),
            part,
            (limit - len(rows),),
        )
        if len(rows) >= limit:
            break
    return [
        EventRow(
            event_id, lead_id, name, from_micros(timestamp), message_id, json_value(data) or {}
        )
        for event_id, lead_id, name, timestamp, message_id, data in rows
    ]


async def load_due_timers(
    connection: SqlConnection, lead_ids: Sequence[int], now: datetime
) -> list[DueTimerRow]:
    rows = await rows_for_ids(
        connection,
        "SELECT t.id, t.lead_id, t.due_at, t.stage, t.epoch, t.transition, e.journey_id,"
        " e.entry_no FROM timers t JOIN enrollments e ON e.id = t.enrollment_id"
        " WHERE t.due_at <= ? AND t.lead_id IN ({ids})",
        (micros(now),),
        lead_ids,
    )
    return [
        DueTimerRow(
            timer_id, lead_id, from_micros(due_at), stage, epoch, transition, journey_id, entry_no
        )
        for timer_id, lead_id, due_at, stage, epoch, transition, journey_id, entry_no in rows
    ]


async def load_enrollments(
    connection: SqlConnection, lead_ids: Sequence[int]
) -> list[EnrollmentRow]:
    rows = await rows_for_ids(
        connection,
        "SELECT id, lead_id, journey_id, version, entry_no, stage, state, epoch, entered_at,"
        " stage_entered_at, ended_at, sequences FROM enrollments WHERE lead_id IN ({ids})",
        (),
        lead_ids,
    )
    return [EnrollmentRow._make((*row[:-1], json_value(row[-1]) or [])) for row in rows]


async def merges_pending(
    connection: SqlConnection, lead_ids: Sequence[int]
) -> list[tuple[int, int]]:
    """(lead_id, merge_lead_id) of pending events of live leads that say two leads are
    one person, oldest first; the partner may have been merged into a third lead since.

    Asked on every batch, as plain SQL: the worker runs it in its trip to SQLite's
    thread with the batch's loads. Two plain queries rather than a join: a join planned
    on a freshly filled events table (no statistics yet) can rescan every pending event
    once per lead.
    """
    found = await rows_for_ids(
        connection,
        "SELECT id, lead_id, merge_lead_id, timestamp FROM events"
        f" WHERE lead_id {{among}} AND merge_lead_id IS NOT NULL AND {STILL_PENDING}",
        (),
        lead_ids,
    )
    if not found:
        return []
    live = await rows_for_ids(
        connection,
        "SELECT id FROM leads WHERE id {among} AND merged_into IS NULL",
        (),
        sorted({lead_id for _, lead_id, _, _ in found}),
    )
    live_ids = {lead_id for (lead_id,) in live}
    found.sort(key=lambda row: (row[3], row[0]))  # timestamp, then arrival
    return [
        (lead_id, merge_lead_id) for _, lead_id, merge_lead_id, _ in found if lead_id in live_ids
    ]


# --- writing a batch -----------------------------------------------------------------------------


class AlreadyProcessed(RuntimeError):
    """Events this transaction applied were applied by another one first.

    Claims make this impossible; the check makes the transaction roll back rather
    than write a step twice should a claim ever fail.
    """


async def mark_processed(
    connection: SqlConnection, event_ids: Sequence[int], now: datetime, error: str | None = None
) -> None:
    marked = await execute_for_ids(
        connection,
        "UPDATE events SET processed_at = ?, error = ? WHERE processed_at IS NULL AND id {among}",
        (micros(now), error),
        event_ids,
    )
    if marked != len(event_ids):
        raise AlreadyProcessed(f"{len(event_ids) - marked} events were processed meanwhile")


async def _update_by_id(
    connection: AsyncConnection, table: Any, columns: Sequence[str], rows: list[dict[str, Any]]
) -> None:
    """One UPDATE ... WHERE id = ? executed for many rows (each row: id and `columns`)."""
    if not rows:
        return
    # Bound names must differ from column names in an UPDATE's SET clause.
    statement = (
        update(table)
        .where(table.c.id == bindparam("_id"))
        .values({column: bindparam(f"_{column}") for column in columns})
    )
    await connection.execute(
        statement, [{f"_{key}": value for key, value in row.items()} for row in rows]
    )


# (id, traits, email, watermark, first_source, first_source_at, updated_at)
LeadUpdate = tuple[
    int, dict[str, Any], str | None, datetime | None, str | None, datetime | None, datetime
]


async def update_leads(connection: SqlConnection, rows: Sequence[LeadUpdate]) -> None:
    await update_rows(
        connection,
        leads,
        ("traits", "email", "watermark", "first_source", "first_source_at", "updated_at"),
        ("id",),
        [
            (
                json_text(traits),
                email,
                micros(watermark),
                first_source,
                micros(first_source_at),
                micros(updated_at),
                lead_id,
            )
            for lead_id, traits, email, watermark, first_source, first_source_at, updated_at in rows
        ],
    )


# (id, watermark, updated_at): None leaves `updated_at` as it is
LeadClock = tuple[int, datetime | None, datetime | None]


async def update_lead_clocks(connection: SqlConnection, rows: Sequence[LeadClock]) -> None:
    """The watermark of leads otherwise unchanged, and their `updated_at` where given."""
    await update_rows(
        connection,
        leads,
        ("watermark", "updated_at"),
        ("id",),
        [
            (micros(watermark), micros(updated_at), lead_id)
            for lead_id, watermark, updated_at in rows
            if updated_at is not None
        ],
    )
    await update_rows(
        connection,
        leads,
        ("watermark",),
        ("id",),
        [
            (micros(watermark), lead_id)
            for lead_id, watermark, updated_at in rows
            if updated_at is None
        ],
    )


# (lead_id, journey_id, entry_no, version, stage, state, epoch, entered_at,
#  stage_entered_at, ended_at, sequences)
NewEnrollment = tuple[
    int, str, int, int, str, str, int, datetime, datetime, datetime | None, Sequence[str]
]


async def insert_enrollments(connection: SqlConnection, rows: Sequence[NewEnrollment]) -> list[int]:
    """The new rows' ids, in the order given.

    Inserted in one go, then read back by their unique key (lead, journey, entry
    number): RETURNING gives no order to match the rows given by.
    """
    if not rows:
        return []
    await insert_rows(
        connection,
        enrollments,
        (
            "lead_id",
            "journey_id",
            "entry_no",
            "version",
            "stage",
            "state",
            "epoch",
            "entered_at",
            "stage_entered_at",
            "ended_at",
            "sequences",
        ),
        [
            (
                lead_id,
                journey_id,
                entry_no,
                version,
                stage,
                state,
                epoch,
                micros(entered_at),
                micros(stage_entered_at),
                micros(ended_at),
                json_text(list(sequences)),
            )
            for (
                lead_id,
                journey_id,
                entry_no,
                version,
                stage,
                state,
                epoch,
                entered_at,
                stage_entered_at,
                ended_at,
                sequences,
            ) in rows
        ],
    )
    found = await rows_for_ids(
        connection,
        "SELECT id, lead_id, journey_id, entry_no FROM enrollments WHERE lead_id IN ({ids})",
        (),
        sorted({row[0] for row in rows}),
    )
    ids = {
        (lead_id, journey_id, entry_no): row_id for row_id, lead_id, journey_id, entry_no in found
    }
    return [ids[(row[0], row[1], row[2])] for row in rows]


async def update_entry_numbers(connection: AsyncConnection, rows: list[dict[str, Any]]) -> None:
    """rows: {id, entry_no}."""
    await _update_by_id(connection, enrollments, ("entry_no",), rows)


# (id, version, stage, state, epoch, stage_entered_at, ended_at, sequences)
EnrollmentUpdate = tuple[int, int, str, str, int, datetime, datetime | None, Sequence[str]]


_RUN_COLUMNS = ("version", "stage", "epoch", "stage_entered_at", "ended_at", "sequences")


async def update_enrollments(connection: SqlConnection, rows: Sequence[EnrollmentUpdate]) -> None:
    """Rewrite the runs' changing columns. A run still active was active before (one
    that ended never starts again: a new entry is a new row), so for those `state` is
    left out of the statement: SQLite keeps up every index a statement's SET names, here
    the partial index of active runs, which cost a fifth of the update."""
    values = [
        (
            state,
            (
                version,
                stage,
                epoch,
                micros(stage_entered_at),
                micros(ended_at),
                json_text(list(sequences)),
            ),
            row_id,
        )
        for row_id, version, stage, state, epoch, stage_entered_at, ended_at, sequences in rows
    ]
    await update_rows(
        connection,
        enrollments,
        _RUN_COLUMNS,
        ("id",),
        [(*run, row_id) for state, run, row_id in values if state == "active"],
    )
    await update_rows(
        connection,
        enrollments,
        (*_RUN_COLUMNS, "state"),
        ("id",),
        [(*run, state, row_id) for state, run, row_id in values if state != "active"],
    )


# (enrollment_id, journey_id, from_stage, to_stage, at, cause as JSON text: `cause_json`)
NewTransition = tuple[int, str, str | None, str | None, datetime, str]


async def insert_transitions(connection: SqlConnection, rows: Sequence[NewTransition]) -> None:
    await insert_rows(
        connection,
        transitions,
        ("enrollment_id", "journey_id", "from_stage", "to_stage", "at", "cause"),
        [
            (enrollment_id, journey_id, from_stage, to_stage, micros(at), cause)
            for enrollment_id, journey_id, from_stage, to_stage, at, cause in rows
        ],
    )


# (enrollment_id, journey_id, message_id, at, value)
NewGoal = tuple[int, str, str, datetime, float | None]


async def insert_goals(connection: SqlConnection, rows: Sequence[NewGoal]) -> None:
    await insert_rows(
        connection,
        goals,
        ("enrollment_id", "journey_id", "message_id", "at", "value"),
        [
            (enrollment_id, journey_id, message_id, micros(at), value)
            for enrollment_id, journey_id, message_id, at, value in rows
        ],
    )


# (due_at, lead_id, enrollment_id, stage, epoch, transition)
NewTimer = tuple[datetime, int, int, str, int, int]


async def insert_timers(connection: SqlConnection, rows: Sequence[NewTimer]) -> None:
    await insert_rows(
        connection,
        timers,
        ("due_at", "lead_id", "enrollment_id", "stage", "epoch", "transition"),
        [
            (micros(due_at), lead_id, enrollment_id, stage, epoch, transition)
            for due_at, lead_id, enrollment_id, stage, epoch, transition in rows
        ],
    )


async def delete_timers(connection: SqlConnection, timer_ids: Sequence[int]) -> None:
    await execute_for_ids(connection, "DELETE FROM timers WHERE id IN ({ids})", (), timer_ids)


async def delete_timers_of(connection: SqlConnection, enrollment_ids: Sequence[int]) -> None:
    await execute_for_ids(
        connection, "DELETE FROM timers WHERE enrollment_id IN ({ids})", (), enrollment_ids
    )


async def postpone_timers(
    connection: AsyncConnection, timer_ids: Sequence[int], due_at: datetime
) -> None:
    await execute_for_ids(
        connection, "UPDATE timers SET due_at = ? WHERE id IN ({ids})", (micros(due_at),), timer_ids
    )


async def mark_outbox_dispatched(
    connection: AsyncConnection, outbox_ids: Sequence[int], now: datetime
) -> None:
    """A channel took these effects over: they are its rows now, not the outbox's."""
    for part in chunks(outbox_ids):
        await connection.execute(
            update(outbox)
            .where(outbox.c.id.in_(part))
            .values(status=OUTBOX_DISPATCHED, updated_at=now)
        )


# (idempotency_key, lead_id, enrollment_id, journey_id, action, target, at)
NewChannelAction = tuple[str, int, int, str, str, str, datetime]


OUTBOX_COLUMNS = (
    "idempotency_key",
    "lead_id",
    "enrollment_id",
    "journey_id",
    "action",
    "target",
    "status",
    "created_at",
    "updated_at",
)


async def insert_outbox(connection: SqlConnection, rows: Sequence[NewChannelAction]) -> None:
    """Channel actions, pending; one that ran already for its idempotency key is ignored."""
    await insert_rows(
        connection,
        outbox,
        OUTBOX_COLUMNS,
        [
            (key, lead_id, enrollment_id, journey_id, action, target, OUTBOX_PENDING, at, at)
            for key, lead_id, enrollment_id, journey_id, action, target, moment in rows
            for at in (micros(moment),)
        ],
        " ON CONFLICT (idempotency_key) DO NOTHING",
    )


# (audience, lead_id, journey_id, added_at, removed_at)
AudienceAdd = tuple[str, int, str, datetime, datetime | None]


async def add_to_audiences(connection: SqlConnection, rows: Sequence[AudienceAdd]) -> None:
    """A current member keeps its original add time; a former member is added again from
    its new add time. The row is marked changed for the exports (`seq` null) unless it
    was and stays a member; a former member back, or one added and removed in one
    batch, is a change. One row per (audience, lead)."""
    await insert_rows(
        connection,
        audience_members,
        ("audience", "lead_id", "journey_id", "added_at", "removed_at"),
        [
            (audience, lead_id, journey_id, micros(added_at), micros(removed_at))
            for audience, lead_id, journey_id, added_at, removed_at in rows
        ],
        " ON CONFLICT (audience, lead_id) DO UPDATE SET"
        " journey_id = excluded.journey_id,"
        " added_at = CASE WHEN audience_members.removed_at IS NULL"
        " THEN audience_members.added_at ELSE excluded.added_at END,"
        " removed_at = excluded.removed_at,"
        " seq = CASE WHEN audience_members.removed_at IS NULL AND excluded.removed_at IS NULL"
        " THEN audience_members.seq END,"
        " erased = NULL",
    )


# (audience, lead_id, removed_at)
AudienceRemoval = tuple[str, int, datetime]


async def remove_from_audiences(connection: SqlConnection, rows: Sequence[AudienceRemoval]) -> None:
    """Only current members are removed. One row per (audience, lead)."""
    await update_rows(
        connection,
        audience_members,
        ("removed_at",),
        ("audience", "lead_id"),
        [(micros(removed_at), audience, lead_id) for audience, lead_id, removed_at in rows],
        also="seq = NULL",
        where="removed_at IS NULL",
    )


async def renumber_memberships(connection: SqlConnection, lead_ids: Sequence[int]) -> None:
    """The leads' current memberships changed (their identifiers did): numbered again,
    so that the next sync of each audience sends them anew."""
    if lead_ids:
        await execute_for_ids(
            connection,
            "UPDATE audience_members SET seq = NULL"
            " WHERE removed_at IS NULL AND seq IS NOT NULL AND lead_id IN ({ids})",
            (),
            list(lead_ids),
        )


async def forward_to_survivor(connection: AsyncConnection, absorbed: int, survivor: int) -> None:
    """Ids and pending events of a merged lead belong to the lead it was merged into.

    Also run for a lead already merged: ingestion may have routed a message, or even
    mapped a new id, to it just before the merge committed.
    """
    await connection.execute(
        update(identities).where(identities.c.lead_id == absorbed).values(lead_id=survivor)
    )
    await connection.execute(
        update(events)
        .where(events.c.lead_id == absorbed, text(STILL_PENDING))
        .values(lead_id=survivor)
    )


async def move_lead_rows(connection: AsyncConnection, absorbed: int, survivor: int) -> None:
    """Point everything of `absorbed` at `survivor` (enrollment conflicts are settled first)."""
    await forward_to_survivor(connection, absorbed, survivor)
    for table in (enrollments, timers, outbox, emails, sequence_runs, offer_codes):
        await connection.execute(
            update(table).where(table.c.lead_id == absorbed).values(lead_id=survivor)
        )


# --- monitoring ----------------------------------------------------------------------------------


def _count_unnumbered_changes(connection: AsyncConnection) -> Select[Any]:
    """The count of membership changes not numbered yet, from their partial index.
    SQLite, planning without statistics, would rather scan the whole index of
    (`audience`, `seq`) for the nulls, a cost that grows with the audiences: it is
    told which index to read."""
    if connection.dialect.name == "sqlite":
        return (
            select(func.count())
            .select_from(text("audience_members INDEXED BY ix_audience_members_unsequenced"))
            .where(text("seq IS NULL"))
        )
    return select(func.count()).where(audience_members.c.seq.is_(None))


async def queue_depths(connection: AsyncConnection, now: datetime) -> dict[str, int]:
    """How much work waits, by queue; each count is served by an index."""
    counts = {
        "events_pending": select(func.count()).where(events.c.processed_at.is_(None)),
        "timers_due": select(func.count()).where(timers.c.due_at <= now),
        "outbox_pending": select(func.count()).where(outbox.c.status == OUTBOX_PENDING),
        "emails_due": select(func.count()).where(
            emails.c.status.in_(("queued", "deferred", "sending")), emails.c.due_at <= now
        ),
        "sequence_steps_due": select(func.count()).where(
            sequence_runs.c.status == "active", sequence_runs.c.next_at <= now
        ),
        "audience_changes_unnumbered": _count_unnumbered_changes(connection),
    }
    return {name: int(await connection.scalar(query) or 0) for name, query in counts.items()}
