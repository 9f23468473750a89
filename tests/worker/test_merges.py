"""Identity merges that meet other merges, re-entries and several runs."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import insert

from engine.db.schema import enrollments, events, leads
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}


async def _runs(engine: Engine, lead: int) -> list[tuple[int, str]]:
    """(entry number, state) of the lead's runs, in order of entry."""
    rows = await engine.rows(enrollments, lead_id=lead)
    return [(row.entry_no, row.state) for row in sorted(rows, key=lambda row: row.entered_at)]


async def test_chained_merges_end_in_one_lead(engine: Engine) -> None:
    await engine.send("identify", userId="a")
    await engine.send("identify", userId="b")
    await engine.send("page", anonymousId="c", properties=CATALOG)
    await engine.run()
    a, b, c = (
        await engine.lead_id(user_id="a"),
        await engine.lead_id(user_id="b"),
        await engine.lead_id(anonymous_id="c"),
    )
    # b is a's old id (b merges into a); then b's browser turns out to be c's.
    await engine.send("alias", previousId="b", userId="a")
    engine.clock.advance(timedelta(seconds=1))
    await engine.send("identify", userId="b", anonymousId="c")
    await engine.run()

    merged_into = {row.id: row.merged_into for row in await engine.rows(leads)}
    assert merged_into == {a: None, b: a, c: a}
    assert await engine.lead_id(anonymous_id="c") == a
    assert await engine.stages(a) == [("visitor", "active")]


async def test_reentry_after_a_merge_starts_a_new_run(engine: Engine) -> None:
    await engine.send("page", anonymousId="x", properties=CATALOG)
    await engine.run()
    await engine.send("track", anonymousId="x", event="opted_out")
    await engine.run(timedelta(minutes=1))
    await engine.send("page", userId="u", properties=CATALOG)
    await engine.run(timedelta(minutes=1))
    await engine.send("track", userId="u", event="opted_out")
    await engine.run(timedelta(minutes=1))
    await engine.send("identify", userId="u", anonymousId="x")
    await engine.run(timedelta(minutes=1))

    await engine.send("page", userId="u", properties=CATALOG)
    await engine.run()

    u = await engine.lead_id(user_id="u")
    assert await _runs(engine, u) == [(1, "exited"), (2, "exited"), (3, "active")]
    history = await engine.history(u)
    assert history.count((None, "visitor", "entry")) == 3


async def test_merging_a_lead_with_several_runs_numbers_them_in_order_of_entry(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="x", properties=CATALOG)
    await engine.run()
    await engine.send("track", anonymousId="x", event="opted_out")
    await engine.run(timedelta(minutes=1))
    await engine.send("page", anonymousId="x", properties=CATALOG)
    await engine.run(timedelta(minutes=1))
    await engine.send("page", userId="u", properties=CATALOG)
    await engine.run(timedelta(minutes=1))

    await engine.send("identify", userId="u", anonymousId="x")
    await engine.send("page", anonymousId="someone-else", properties=CATALOG)
    await engine.run()

    u = await engine.lead_id(user_id="u")
    # x's second run entered before u's own: it goes on, u's run ends.
    assert await _runs(engine, u) == [(1, "exited"), (2, "active"), (3, "exited")]
    assert await engine.pending_events() == 0
    assert await engine.stages(await engine.lead_id(anonymous_id="someone-else")) == [
        ("visitor", "active")
    ]


async def test_an_event_routed_to_a_lead_as_it_was_merged_goes_on_to_the_lead_it_joined(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="x", properties=CATALOG)
    await engine.send("page", userId="u", properties=CATALOG)
    await engine.run()
    x, u = await engine.lead_id(anonymous_id="x"), await engine.lead_id(user_id="u")
    await engine.send("identify", userId="u", anonymousId="x")
    await engine.run(timedelta(minutes=1))
    assert (await engine.lead(x)).merged_into == u
    # Ingestion routed this page to x just before the merge committed.
    engine.clock.advance(timedelta(minutes=1))
    async with engine.runtime.db.write() as connection:
        await connection.execute(
            insert(events).values(
                message_id="late-page",
                lead_id=x,
                type="page",
                name="page",
                timestamp=engine.clock.now(),
                received_at=engine.clock.now(),
                anonymous_id="x",
                data={"properties": {"path": "/landing/steel"}},
            )
        )
    await engine.run()

    (late,) = await engine.rows(events, message_id="late-page")
    assert (late.lead_id, late.processed_at is not None) == (u, True)
    # x's run entered first: it went on in u (u's own ended), and the page moves it.
    assert await engine.stages(u) == [("visitor", "exited"), ("interested", "active")]
    assert await engine.stages(x) == []
    assert await engine.pending_events() == 0
