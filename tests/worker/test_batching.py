"""The worker's batches sized by their duration: short while other writers wait."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db import queries
from engine.db.database import Database
from engine.runtime import TurnTakingDatabase
from engine.worker.batching import POSTGRES_SMALLEST, BatchSize, for_database
from engine.worker.processor import Processor
from tests.ingest.test_writer_turns import lock_is_free
from tests.worker.conftest import Engine, running_engine, write_funnel

CATALOG = {"path": "/catalog/steel"}


# --- the size, from the batches it is told of ----------------------------------------------------


def test_a_batch_slower_than_the_target_shrinks_the_next() -> None:
    size = BatchSize(first=400, contended_target_s=0.01)
    # 400 leads in 40 ms while others waited: 100 would have fit in 10 ms.
    size.observe(400, 0.04, others_waited=True)
    assert size.leads == 200  # half way, geometrically: sqrt(400 * 100)
    size.observe(200, 0.02, others_waited=True)
    assert size.leads == 141  # sqrt(200 * 100)


def test_a_batch_alone_grows_toward_the_longer_target() -> None:
    size = BatchSize(first=200, alone_target_s=0.2)
    # 200 leads in 10 ms with nobody waiting: 4,000 would fit in 200 ms.
    size.observe(200, 0.01, others_waited=False)
    assert size.leads == round((200 * 4_000) ** 0.5)


def test_the_same_batch_is_judged_by_whether_others_waited() -> None:
    waited, alone = BatchSize(first=300), BatchSize(first=300)
    waited.observe(300, 0.05, others_waited=True)
    alone.observe(300, 0.05, others_waited=False)
    assert waited.leads < 300 < alone.leads


def test_the_size_stays_within_its_bounds() -> None:
    size = BatchSize(smallest=20, first=100, largest=1_000)
    for _ in range(20):
        size.observe(size.leads, 5.0, others_waited=True)
    assert size.leads == 20
    for _ in range(20):
        size.observe(size.leads, 0.0001, others_waited=False)
    assert size.leads == 1_000


def test_a_batch_less_than_half_full_teaches_nothing() -> None:
    size = BatchSize(first=400)
    # Ten leads that happened to be waiting, mostly the batch's fixed costs.
    size.observe(10, 0.05, others_waited=True)
    assert size.leads == 400
    size.observe(400, 0, others_waited=True)  # no time measured: nothing to learn
    assert size.leads == 400


def test_bounds_out_of_order_are_refused() -> None:
    with pytest.raises(ValueError, match="smallest <= first <= largest"):
        BatchSize(smallest=500, first=200, largest=1_000)


def test_a_fixed_batch_size_never_moves() -> None:
    size = BatchSize(smallest=3, first=3, largest=3)
    size.observe(3, 10.0, others_waited=True)
    size.observe(3, 0.0001, others_waited=False)
    assert size.leads == 3


def test_postgres_batches_stay_large_where_sqlite_ones_shrink() -> None:
    postgres, sqlite = for_database(is_sqlite=False), for_database(is_sqlite=True)
    assert postgres.leads >= POSTGRES_SMALLEST > sqlite.leads
    for _ in range(10):
        postgres.observe(postgres.leads, 10.0, others_waited=False)
        sqlite.observe(sqlite.leads, 10.0, others_waited=True)
    assert postgres.leads == POSTGRES_SMALLEST
    assert sqlite.leads < 50


# --- the worker's batches ------------------------------------------------------------------------


class RecordedSize(BatchSize):
    def __init__(self, leads: int) -> None:
        super().__init__(smallest=leads, first=leads, largest=leads)
        self.seen: list[tuple[int, bool]] = []

    def observe(self, leads: int, seconds: float, *, others_waited: bool) -> None:
        assert seconds > 0
        self.seen.append((leads, others_waited))
        super().observe(leads, seconds, others_waited=others_waited)


async def _send_leads(engine: Engine, count: int) -> None:
    for number in range(count):
        await engine.send("page", anonymousId=f"a{number}", properties=CATALOG)


async def test_batches_claim_the_size_and_say_whether_they_were_full(engine: Engine) -> None:
    await _send_leads(engine, 5)
    processor = Processor(engine.runtime.db, engine.runtime.book, engine.clock, batch_leads=2)
    sizes = RecordedSize(2)
    processor.event_batches = sizes

    assert await processor.process_events() == 2
    assert processor.last_batch_full
    assert await processor.process_events() == 2
    assert await processor.process_events() == 1
    assert not processor.last_batch_full
    assert await processor.process_events() == 0
    assert [leads for leads, _ in sizes.seen] == [2, 2, 1]
    assert await engine.pending_events() == 0


class Looks:
    """Counts the read transactions `db` opens from now on: the worker's looks on a
    reader for pending events."""

    def __init__(self, db: Database) -> None:
        self.count = 0
        read = db.read

        def counted_read() -> Any:
            self.count += 1
            return read()

        db.read = counted_read  # type: ignore[method-assign]


async def test_only_a_batch_after_one_that_was_not_full_looks_on_a_reader_first(
    engine: Engine,
) -> None:
    """An idle poll must not queue for the writer; a batch after a full one need not ask."""
    await _send_leads(engine, 5)
    db = engine.runtime.db
    processor = Processor(db, engine.runtime.book, engine.clock, batch_leads=2)
    looks = Looks(db)
    taken = [await processor.process_events() for _ in range(5)]

    assert taken == [2, 2, 1, 0, 0]
    # The first batch looked; the two after a full batch did not; the two polls after
    # the batch of one looked, found nothing and went no further.
    assert looks.count == 3
    assert await engine.pending_events() == 0


async def test_a_batch_of_announced_events_does_not_look_on_a_reader_first(
    engine: Engine,
) -> None:
    """Events the inbox says it committed are known to wait: the look would cost a read
    transaction for nothing. A batch that then finds none claims nothing, and says so."""
    db = engine.runtime.db
    processor = Processor(db, engine.runtime.book, engine.clock, batch_leads=10)
    looks = Looks(db)
    await _send_leads(engine, 3)
    assert await processor.process_events(announced=True) == 3
    assert await processor.process_events(announced=True) == 0
    assert looks.count == 0
    assert await processor.process_events() == 0
    assert looks.count == 1
    assert await engine.pending_events() == 0


async def test_a_batch_that_keeps_another_writer_waiting_knows_it(engine: Engine) -> None:
    """On SQLite another write waits for the batch to commit, and the batch is told so;
    on PostgreSQL writers do not wait for one another, so no batch is ever contended."""
    db = engine.runtime.db
    waiting: list[asyncio.Task[None]] = []

    async def other_write() -> None:
        async with db.write() as connection:
            await connection.exec_driver_sql("SELECT 1")

    async def start_another_writer(
        _connection: AsyncConnection, _events: Sequence[queries.EventRow], _now: datetime
    ) -> None:
        # Inside the batch's transaction: a second writer asks for its turn.
        if not waiting:
            waiting.append(asyncio.create_task(other_write()))
            await asyncio.sleep(0)  # the task runs up to its wait for the writer
            assert db.writers == 2

    await _send_leads(engine, 3)
    processor = Processor(db, engine.runtime.book, engine.clock, event_hooks=[start_another_writer])
    sizes = RecordedSize(2)
    processor.event_batches = sizes
    await processor.process_events()
    await asyncio.gather(*waiting)
    await processor.process_events()  # the last lead, nobody else writing

    assert sizes.seen == [(2, db.is_sqlite), (1, False)]
    assert db.writers == 0


async def test_a_batch_knows_when_a_writer_of_another_process_waits(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """`cjm serve --worker-process`: the server's inbox waits for the worker's batch in
    another process; the batch must be told so, or the worker sizes its batches as if
    it had the database to itself, and tracking calls wait behind them."""
    path = tmp_path / "cjm.db"
    shutil.copy(sqlite_template, path)
    url = f"sqlite+aiosqlite:///{path}"
    server = TurnTakingDatabase(url, Path(f"{path}.writers"))  # as the server opens it
    outsider = os.open(f"{path}.writers-waiting", os.O_RDWR | os.O_CREAT)
    waiting: list[asyncio.Task[None]] = []

    async def server_write() -> None:
        async with server.write() as connection:
            await connection.exec_driver_sql("SELECT 1")

    async def start_the_servers_write(
        _connection: AsyncConnection, _events: Sequence[queries.EventRow], _now: datetime
    ) -> None:
        if not waiting:
            waiting.append(asyncio.create_task(server_write()))
            for _ in range(200):  # until its thread waits for the turn
                await asyncio.sleep(0.05)
                if not lock_is_free(outsider):  # the shared lock of the server's wait
                    break

    try:
        async with running_engine(url, write_funnel(tmp_path), writers_take_turns=True) as engine:
            await _send_leads(engine, 3)
            db = engine.runtime.db
            processor = Processor(
                db, engine.runtime.book, engine.clock, event_hooks=[start_the_servers_write]
            )
            sizes = RecordedSize(2)
            processor.event_batches = sizes
            await processor.process_events()
            await asyncio.gather(*waiting)
            await processor.process_events()  # the last lead, nobody waiting

            assert sizes.seen == [(2, True), (1, False)]
            assert db.writers == 0  # in its own process, it was alone throughout
    finally:
        await server.close()
        os.close(outsider)


async def test_the_writers_gauge_comes_back_after_a_failed_transaction(
    database_url: str,
) -> None:
    db = Database(database_url)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            async with db.write():
                assert db.writers == 1
                raise RuntimeError("boom")

        async def fail(_connection: object) -> None:
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await db.write_sql(fail)
        assert db.writers == 0
    finally:
        await db.close()
