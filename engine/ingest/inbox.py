"""The inbox writer: group commit of accepted messages into the events table.

A 200 must mean the message is on disk, but a commit per HTTP request would cap
ingestion at the disk's flush rate. So requests queue their messages and wait; one
writer task takes everything queued, writes it in one transaction, and wakes every
waiter at once. Under light load a group is one request (no added latency); under
heavy load a flush carries thousands of messages.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.clock import Clock
from engine.db.database import Database
from engine.db.queries import upsert
from engine.db.schema import events
from engine.ingest.identity import Route, resolve_leads
from engine.ingest.messages import Message
from engine.metrics import count_ingested

log = logging.getLogger(__name__)

MAX_GROUP = 5_000


class InboxClosed(RuntimeError):
    """The inbox is not running (not started yet, or stopping): nothing can be accepted."""


@dataclass(frozen=True, slots=True)
class _Waiter:
    messages: Sequence[Message]
    done: asyncio.Future[None]


class Inbox:
    """Accepts messages and returns once they are committed, sharing commits between callers."""

    def __init__(
        self,
        db: Database,
        clock: Clock,
        *,
        on_commit: Callable[[], None] | None = None,
        max_group: int = MAX_GROUP,
    ) -> None:
        self.on_commit = on_commit
        self._db = db
        self._clock = clock
        self._max_group = max_group
        self._queue: deque[_Waiter] = deque()
        self._wake = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        if self._writer is None:
            self._closing = False
            self._writer = asyncio.create_task(self._run(), name="cjm-inbox-writer")

    async def stop(self) -> None:
        """Stop accepting, write what is queued, and end the writer."""
        if self._writer is None:
            return
        self._closing = True
        self._wake.set()
        await self._writer
        self._writer = None

    async def accept(self, messages: Sequence[Message]) -> None:
        """Return once `messages` are committed; raise what failed their transaction.

        A message whose messageId is already stored is accepted and ignored.
        """
        if not messages:
            return
        if self._writer is None or self._closing:
            raise InboxClosed("the inbox is not accepting messages")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append(_Waiter(messages, done))
        self._wake.set()
        await done

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
        return group

    async def _write(self, group: list[_Waiter]) -> None:
        messages = _first_of_each_id(waiter.messages for waiter in group)
        try:
            async with self._db.write() as connection:
                routes = await resolve_leads(connection, messages, self._clock.now())
                await insert_events(connection, messages, routes)
        except Exception as error:
            log.exception("inbox: a group of %d messages was not stored", len(messages))
            for waiter in group:
                if not waiter.done.done():
                    waiter.done.set_exception(error)
            return
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


async def insert_events(
    connection: AsyncConnection, messages: Sequence[Message], routes: Sequence[Route]
) -> None:
    """The messages as inbox rows; a messageId already stored is skipped."""
    rows = [_event_row(message, route) for message, route in zip(messages, routes, strict=True)]
    statement = upsert(connection, events).on_conflict_do_nothing(
        index_elements=[events.c.message_id]
    )
    await connection.execute(statement, rows)


def _event_row(message: Message, route: Route) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if message.properties:
        data["properties"] = message.properties
    if message.context:
        data["context"] = message.context
    if message.traits:
        data["traits"] = message.traits
    if message.previous_id is not None:
        data["previous_id"] = message.previous_id
    return {
        "message_id": message.message_id,
        "lead_id": route.lead_id,
        "type": message.type,
        "name": message.name,
        "timestamp": message.timestamp,
        "received_at": message.received_at,
        "user_id": message.user_id,
        "anonymous_id": message.anonymous_id,
        "data": data,
        "merge_lead_id": route.merge_lead_id,
        "processed_at": None,
        "error": None,
    }
