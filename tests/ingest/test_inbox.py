"""The inbox: accepted means committed, shared commits, one row per messageId."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from engine.clock import ManualClock
from engine.db.database import Database
from engine.db.schema import events
from engine.ingest.inbox import Inbox, InboxClosed, InboxOverloaded
from engine.ingest.messages import Message, MessageType, parse_message
from tests.ingest.write_lock import held_write_lock

NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)


def call(message_id: str, type_: MessageType = "track", **fields: Any) -> Message:
    return parse_message(
        {"messageId": message_id, "anonymousId": "a1", "event": "x", **fields}, type_, NOW
    )


@pytest.fixture
async def inbox(db: Database) -> AsyncIterator[Inbox]:
    inbox = Inbox(db, ManualClock(NOW))
    await inbox.start()
    yield inbox
    await inbox.stop()


async def event_count(db: Database) -> int:
    async with db.read() as connection:
        return int(
            (await connection.execute(select(func.count()).select_from(events))).scalar_one()
        )


async def test_accept_returns_once_the_rows_are_committed(db: Database, inbox: Inbox) -> None:
    await inbox.accept([call("m1"), call("m2")])
    assert await event_count(db) == 2


async def test_an_event_row_carries_the_message(db: Database, inbox: Inbox) -> None:
    await inbox.accept(
        [
            call(
                "m1",
                userId="u1",
                event="order_completed",
                properties={"revenue": 12.5},
                context={"ip": "1.2.3.4"},
                timestamp="2026-03-02T11:00:00Z",
            )
        ]
    )
    async with db.read() as connection:
        row = (await connection.execute(select(events))).one()
    assert (row.message_id, row.type, row.name, row.user_id, row.anonymous_id) == (
        "m1",
        "track",
        "order_completed",
        "u1",
        "a1",
    )
    assert (row.timestamp, row.received_at) == (datetime(2026, 3, 2, 11, 0, tzinfo=UTC), NOW)
    assert row.data == {"properties": {"revenue": 12.5}, "context": {"ip": "1.2.3.4"}}
    assert (row.merge_lead_id, row.processed_at, row.error) == (None, None, None)


async def test_identify_traits_and_alias_previous_id_are_kept_in_data(
    db: Database, inbox: Inbox
) -> None:
    await inbox.accept(
        [
            call("m1", "identify", userId="u1", traits={"email": "a@x.test"}),
            call("m2", "alias", userId="u1", previousId="a1"),
        ]
    )
    async with db.read() as connection:
        data = list(
            (await connection.execute(select(events.c.data).order_by(events.c.id))).scalars()
        )
    assert data == [{"traits": {"email": "a@x.test"}}, {"previous_id": "a1"}]


async def test_a_repeated_message_id_is_accepted_and_stored_once(
    db: Database, inbox: Inbox
) -> None:
    await inbox.accept([call("m1"), call("m1")])
    await inbox.accept([call("m1", event="other")])
    assert await event_count(db) == 1


async def test_concurrent_callers_share_commits(db: Database, inbox: Inbox) -> None:
    commits: list[int] = []
    inbox.on_commit = lambda: commits.append(1)
    await asyncio.gather(*(inbox.accept([call(f"m{n}")]) for n in range(20)))
    assert await event_count(db) == 20
    assert len(commits) < 20


async def test_a_group_holds_whole_callers_up_to_its_size(db: Database) -> None:
    commits: list[int] = []
    inbox = Inbox(db, ManualClock(NOW), on_commit=lambda: commits.append(1), max_group=4)
    await inbox.start()
    await asyncio.gather(*(inbox.accept([call(f"m{n}a"), call(f"m{n}b")]) for n in range(4)))
    await inbox.stop()
    assert await event_count(db) == 8
    assert len(commits) >= 2


async def test_a_failed_transaction_fails_every_caller_of_its_group(tmp_path: Path) -> None:
    # A database without tables: every insert fails.
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}")
    inbox = Inbox(db, ManualClock(NOW))
    await inbox.start()
    try:
        results = await asyncio.gather(
            inbox.accept([call("m1")]), inbox.accept([call("m2")]), return_exceptions=True
        )
    finally:
        await inbox.stop()
        await db.close()
    assert all(isinstance(result, Exception) for result in results)


async def test_stop_writes_what_is_queued(db: Database) -> None:
    inbox = Inbox(db, ManualClock(NOW))
    await inbox.start()
    pending = [asyncio.create_task(inbox.accept([call(f"m{n}")])) for n in range(5)]
    await asyncio.sleep(0)
    await inbox.stop()
    await asyncio.gather(*pending)
    assert await event_count(db) == 5


async def test_a_stopped_inbox_refuses_messages(db: Database) -> None:
    inbox = Inbox(db, ManualClock(NOW))
    with pytest.raises(InboxClosed):
        await inbox.accept([call("m1")])
    await inbox.start()
    await inbox.stop()
    with pytest.raises(InboxClosed):
        await inbox.accept([call("m1")])


async def stored_ids(db: Database) -> list[str]:
    async with db.read() as connection:
        return list((await connection.execute(select(events.c.message_id))).scalars())


async def settle(tasks: list[asyncio.Task[None]]) -> tuple[list[str], list[str]]:
    """The message ids of the calls that were accepted, and of those refused as overload."""
    accepted: list[str] = []
    refused: list[str] = []
    for n, result in enumerate(await asyncio.gather(*tasks, return_exceptions=True)):
        if result is None:
            accepted.append(f"m{n}")
        elif isinstance(result, InboxOverloaded):
            refused.append(f"m{n}")
        else:
            raise result
    return accepted, refused


async def wait_until(condition: Any) -> None:
    """Liveness only: a generous bound so a broken inbox fails instead of hanging."""
    for _ in range(600):
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the inbox never got there")


async def test_a_full_queue_refuses_new_messages_at_once_and_stores_the_queued_ones(
    db: Database,
) -> None:
    # One message at a time, three queued at most, and no message ever expires here:
    # with the writer held back, calls beyond those four can only be refused.
    inbox = Inbox(db, ManualClock(NOW), max_group=1, max_queued=3, max_wait_s=600)
    await inbox.start()
    try:
        async with held_write_lock(db):
            tasks = []
            for n in range(7):
                tasks.append(asyncio.create_task(inbox.accept([call(f"m{n}")])))
                await asyncio.sleep(0.02)
            # Refused while the lock is still held: answered without waiting for storage.
            await wait_until(lambda: sum(task.done() for task in tasks) >= 3)
            refused_early = [n for n, task in enumerate(tasks) if task.done()]
            assert all(isinstance(tasks[n].exception(), InboxOverloaded) for n in refused_early)
            with pytest.raises(InboxOverloaded):
                await inbox.accept([call("late")])
        accepted, refused = await settle(tasks)
        await inbox.accept([call("after")])  # caught up: accepting again
    finally:
        await inbox.stop()

    assert "m0" in accepted
    assert len(accepted) == 4 and len(refused) == 3
    stored = await stored_ids(db)
    assert sorted(stored) == sorted([*accepted, "after"])  # each once, the refused never


async def test_a_message_waiting_too_long_is_refused_and_never_stored(db: Database) -> None:
    inbox = Inbox(db, ManualClock(NOW), max_group=1, max_wait_s=0.5)
    await inbox.start()
    try:
        async with held_write_lock(db):
            first = asyncio.create_task(inbox.accept([call("m0")]))
            await asyncio.sleep(0.05)
            second = asyncio.create_task(inbox.accept([call("m1")]))
            # The queued call is refused while the writer is still held back ...
            await wait_until(second.done)
            assert isinstance(second.exception(), InboxOverloaded)
            # ... and so is any new one, at once, while the backlog lasts.
            with pytest.raises(InboxOverloaded):
                await inbox.accept([call("m2")])
            assert not first.done()  # taken by the writer: it waits for its outcome
        accepted, refused = await settle([first, second])
    finally:
        await inbox.stop()

    assert (accepted, refused) == (["m0"], ["m1"])
    assert await stored_ids(db) == ["m0"]


async def test_event_ids_follow_the_order_the_messages_arrived_in(
    db: Database, inbox: Inbox
) -> None:
    """Not the messageIds' order, which PostgreSQL inserts them in: the ids order a
    lead's events of the same instant."""
    arrived = ["m3", "m1", "m2", "m0"]

    await inbox.accept([call(message_id) for message_id in arrived])

    async with db.read() as connection:
        stored = (await connection.scalars(select(events.c.message_id).order_by(events.c.id))).all()
    assert stored == arrived


# PostgreSQL only: on SQLite one writer at a time, so no two transactions wait on each other.
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_processes_storing_the_same_messages_in_different_orders_all_succeed(
    database_url: str, db: Database
) -> None:
    """A batch sent again to another API process while the first still writes it: were
    the two to insert the same messageIds in the orders of their groups, each could wait
    on a row the other wrote, and PostgreSQL would abort one to break the deadlock.
    Every caller is answered 200 and every message stored once."""
    processes, rounds, size, visitors = 4, 3, 5_000, 700
    handles = [Database(database_url) for _ in range(processes)]
    inboxes = [Inbox(handle, ManualClock(NOW)) for handle in handles]
    try:
        for inbox in inboxes:
            await inbox.start()
        # The visitors known already: nothing to map, so the groups meet first at the
        # events, not at the identities (which every process writes in one order).
        await inboxes[0].accept([call(f"first-{v}", anonymousId=f"a{v}") for v in range(visitors)])
        for round_ in range(rounds):
            batch = [call(f"r{round_}-m{m}", anonymousId=f"a{m % visitors}") for m in range(size)]
            turned = batch[size // 2 :] + batch[: size // 2]
            orders = [batch, batch[::-1], turned, turned[::-1]]
            outcomes = await asyncio.gather(
                *(inbox.accept(order) for inbox, order in zip(inboxes, orders, strict=True)),
                return_exceptions=True,
            )
            assert [o for o in outcomes if isinstance(o, BaseException)] == []
    finally:
        for inbox in inboxes:
            await inbox.stop()
        for handle in handles:
            await handle.close()
    assert await event_count(db) == visitors + rounds * size
