"""The inbox writer: group commit of accepted messages into the events table.

A 200 must mean the message is on disk, but a commit per HTTP request would cap
ingestion at the disk's flush rate. So requests queue their messages and wait; one
writer task takes everything queued, writes it in one transaction, and wakes every
waiter at once. Under light load a group is one request (no added latency); under
heavy load a flush carries thousands of messages.

When the writer cannot keep up (the database is slow, or another process holds
its write lock) the inbox says so at once rather than let callers wait until they
give up: a message is answered within MAX_WAIT_S, stored or refused with
InboxOverloaded (503 and Retry-After for the caller), and new messages are refused
at once while the backlog is beyond its bounds. A refused message was never
written; a message the writer has taken is always answered with the outcome of its
transaction, so nothing refused is stored and nothing accepted is lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.clock import Clock
from engine.db.database import Database, SqlConnection
from engine.db.queries import insert_rows, json_text, micros, reserve_ids
from engine.db.schema import events
from engine.ingest.identity import Route, ids_to_look_up, resolve_leads
from engine.ingest.messages import Message
from engine.metrics import count_ingested

log = logging.getLogger(__name__)

MAX_GROUP = 5_000
# The longest a message waits in the queue before it is refused. Well above the waits
# of a saturated but healthy writer (a full group takes about a second on SQLite, and
# takes turns on the write lock with the worker; several seconds on a machine whose
# cores are all busy), and below the time tracking clients commonly wait for an answer
# (10 to 15 s).
MAX_WAIT_S = 8.0
# New messages are refused at once while this many are queued (ten full groups), or
# while the oldest queued message, or the group being written, has waited more than
# half of MAX_WAIT_S: a new one would wait about as long behind them.
MAX_QUEUED = 10 * MAX_GROUP


class InboxClosed(RuntimeError):
    """The inbox is not running (not started yet, or stopping): nothing can be accepted."""


class InboxOverloaded(RuntimeError):
    """The messages were refused, not stored: the writer is behind; retry shortly."""


@dataclass(eq=False, slots=True)
class _Waiter:
    messages: Sequence[Message]
    done: asyncio.Future[None]
    queued_at: float


class Inbox:
    """Accepts messages and returns once they are committed, sharing commits between callers."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        on_commit: Callable[[], None] | None = None,
        max_group: int = MAX_GROUP,
        max_wait_s: float = MAX_WAIT_S,
        max_queued: int = MAX_QUEUED,
    ) -> None:
        self.on_commit = on_commit
        self._db = db
        self._clock = clock
        self._max_group = max_group
        self._max_wait_s = max_wait_s
        self._refuse_after_s = max_wait_s / 2
        self._max_queued = max_queued
        self._queue: deque[_Waiter] = deque()
        self._queued = 0  # messages in the queue
        self._writing_since: float | None = None  # when the group being written was taken
        self._overloaded = False  # for logging each overload once, not each refusal
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._expiry: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        if self._writer is None:
            self._closing = False
            self._writer = asyncio.create_task(self._run(), name="cjm-inbox-writer")
            self._expiry = asyncio.create_task(self._expire(), name="cjm-inbox-expiry")

    async def stop(self) -> None:
        """Stop accepting, write what is queued, and end the writer."""
        if self._writer is None:
            return
        self._closing = True
        self._wake.set()
        await self._writer
        self._writer = None
        if self._expiry is not None:
            self._expiry.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._expiry
            self._expiry = None

    async def accept(self, messages: Sequence[Message]) -> None:
        """Return once `messages` are committed; raise what failed their transaction.

        A message whose messageId is already stored is accepted and ignored.
        """
        if not messages:
            return
        if self._writer is None or self._closing:
            raise InboxClosed("the inbox is not accepting messages")
        now = time.monotonic()
        backlog = self._backlog(now)
        if backlog is not None:
            self._note_overload(backlog)
            raise InboxOverloaded(backlog)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(messages, done, now))
        self._queued += len(messages)
        self._wake.set()
        await done

    def _backlog(self, now: float) -> str | None:
        """Why a new message would wait too long, if it would."""
        if self._queued >= self._max_queued:
            return f"{self._queued} messages are waiting to be stored"
        if self._queue and now - self._queue[0].queued_at > self._refuse_after_s:
            return f"messages have waited {now - self._queue[0].queued_at:.1f} s to be stored"
        if self._writing_since is not None and now - self._writing_since > self._refuse_after_s:
            return f"storing a group has taken {now - self._writing_since:.1f} s so far"
        return None

    def _note_overload(self, reason: str) -> None:
        if not self._overloaded:
            self._overloaded = True
            log.warning("inbox: %s; refusing messages with 503 until it catches up", reason)

    async def _expire(self) -> None:
        """Refuse the messages that have waited MAX_WAIT_S without being taken."""
        while True:
            await asyncio.sleep(self._max_wait_s / 10)
            deadline = time.monotonic() - self._max_wait_s
            while self._queue and self._queue[0].queued_at <= deadline:
                waiter = self._queue.popleft()
                self._queued -= len(waiter.messages)
                self._note_overload(f"messages waited {self._max_wait_s:.0f} s to be stored")
                if not waiter.done.done():
                    waiter.done.set_exception(InboxOverloaded("waited too long to be stored"))
            if self._overloaded and self._backlog(time.monotonic()) is None:
                self._overloaded = False
                log.warning("inbox: caught up; accepting messages again")

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                await self._write(self._take_group())
            if self._closing:
                return

    def _take_group(self) -> list[_Waiter]:
        """Whole callers, oldest first, up to about `max_group` messages."""
        group = [self._queue.popleft()]
        size = len(group[0].messages)
        while self._queue and size + len(self._queue[0].messages) <= self._max_group:
            waiter = self._queue.popleft()
            group.append(waiter)
            size += len(waiter.messages)
        self._queued -= size
        return group

    async def _write(self, group: list[_Waiter]) -> None:
        messages = _first_of_each_id(waiter.messages for waiter in group)
        self._writing_since = time.monotonic()
        now = self._clock.now()
        # Worked out before the writer's turn, since on SQLite the worker waits while
        # the transaction runs: the ids to look up, and all of each row but its lead,
        # which only the transaction can tell.
        ids = ids_to_look_up(messages)
        rows = [_event_fields(message) for message in messages]

        async def store(connection: SqlConnection) -> None:
            routes = await resolve_leads(connection, messages, now, ids)
            await insert_events(connection, rows, routes)

        try:
            await self._db.write_sql(store)
        except Exception as error:
            log.exception("inbox: a group of %d messages was not stored", len(messages))
            for waiter in group:
                if not waiter.done.done():
                    waiter.done.set_exception(error)
            return
        finally:
            self._writing_since = None
        count_ingested(message.type for message in messages)
        if self.on_commit is not None:
            try:
                self.on_commit()
            except Exception:
                log.exception("inbox: on_commit failed")
        for waiter in group:
            if not waiter.done.done():
                waiter.done.set_result(None)


def _first_of_each_id(batches: Iterable[Sequence[Message]]) -> list[Message]:
    """The group's messages in arrival order, a repeated messageId kept once."""
    seen: set[str] = set()
    unique: list[Message] = []
    for batch in batches:
        for message in batch:
            if message.message_id not in seen:
                seen.add(message.message_id)
                unique.append(message)
    return unique


# The hot insert as plain SQL on tuples: the driver's executemany, without SQLAlchemy's
# processing of each row's parameters (most of the cost of a large batch). A row is the
# message's fields (`_event_fields`), then the two columns its route gives.
EVENT_COLUMNS = (
    "message_id",
    "type",
    "name",
    "timestamp",
    "received_at",
    "user_id",
    "anonymous_id",
    "data",
    "lead_id",
    "merge_lead_id",
)
EventFields = tuple[str, str, str, int | None, int | None, str | None, str | None, str]


async def insert_events(
    connection: SqlConnection, fields: Sequence[EventFields], routes: Sequence[Route]
) -> None:
    """The messages (as `_event_fields`) as inbox rows, their ids in the group's order
    (which orders a lead's events of the same instant); a messageId already stored is
    skipped.

    On PostgreSQL the rows go in in messageId order, with ids reserved beforehand in
    the group's order. Two API processes storing the same messages (a batch a client
    sent again to another process while the first still wrote it) then take their
    locks on the messageIds in one order, and one waits for the other's commit; in the
    order of their groups, each could wait on a row the other wrote, a deadlock that
    PostgreSQL breaks by aborting one of them. On SQLite one writer at a time.
    """
    rows: list[tuple[Any, ...]] = [
        (*message, route.lead_id, route.merge_lead_id)
        for message, route in zip(fields, routes, strict=True)
    ]
    columns: tuple[str, ...] = EVENT_COLUMNS
    if connection.dialect.name == "postgresql" and len(rows) > 1:
        ids = await reserve_ids(connection, events, len(rows))
        rows = sorted(
            ((event_id, *row) for event_id, row in zip(ids, rows, strict=True)),
            key=lambda row: row[1],  # the messageId
        )
        columns = ("id", *EVENT_COLUMNS)
    await insert_rows(connection, events, columns, rows, " ON CONFLICT (message_id) DO NOTHING")


def _event_fields(message: Message) -> EventFields:
    data: dict[str, Any] = {}
    if message.properties:
        data["properties"] = message.properties
    if message.context:
        data["context"] = message.context
    if message.traits:
        data["traits"] = message.traits
    if message.previous_id is not None:
        data["previous_id"] = message.previous_id
    return (
        message.message_id,
        message.type,
        message.name,
        micros(message.timestamp),
        micros(message.received_at),
        message.user_id,
        message.anonymous_id,
        json_text(data),
    )
