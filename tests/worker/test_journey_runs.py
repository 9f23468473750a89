"""The journey machine end to end below HTTP: inbox, worker, timers, durable state."""

from __future__ import annotations

from datetime import timedelta

from engine.db.schema import events, goals, outbox, timers, transitions
from engine.worker.processor import Processor
from tests.worker.conftest import Engine

CATALOG = {"path": "/catalog/steel"}
LANDING = {"path": "/landing/winter"}


async def test_matching_page_enters_the_lead_at_the_first_stage(engine: Engine) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()

    lead = await engine.lead_id(anonymous_id="a1")
    assert await engine.stages(lead) == [("visitor", "active")]
    assert await engine.history(lead) == [(None, "visitor", "entry")]


async def test_page_that_does_not_match_entry_enrolls_nobody(engine: Engine) -> None:
    await engine.send("page", anonymousId="a1", properties={"path": "/about"})
    await engine.run()

    assert await engine.stages(await engine.lead_id(anonymous_id="a1")) == []


async def test_on_enter_audience_and_trait_are_applied_with_the_transition(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()

    lead = await engine.lead_id(anonymous_id="a1")
    assert await engine.audiences(lead) == {"visitors": True}
    assert (await engine.lead(lead)).traits == {"lifecycle": "visitor"}


async def test_timeout_moves_lead_to_retarget_when_no_landing_visit_within_2h(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    await engine.run(timedelta(hours=1, minutes=59))
    assert await engine.stages(lead) == [("visitor", "active")]

    await engine.run(timedelta(minutes=1))
    assert await engine.stages(lead) == [("retarget", "active")]
    assert (await engine.history(lead))[-1] == ("visitor", "retarget", "timer")
    assert await engine.audiences(lead) == {"visitors": True, "abandoners": True}


async def test_event_before_the_timeout_moves_the_lead_and_cancels_the_timer(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run(timedelta(minutes=30))
    await engine.send("page", anonymousId="a1", properties=LANDING)
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    assert await engine.stages(lead) == [("interested", "active")]
    assert await engine.timers(lead) == []
    await engine.run(timedelta(days=30))
    assert await engine.history(lead) == [
        (None, "visitor", "entry"),
        ("visitor", "interested", "event"),
    ]


async def test_channel_actions_wait_in_the_outbox_once_per_stage_entry(engine: Engine) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.send("page", anonymousId="a1", properties=LANDING)
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    assert await engine.outbox(lead) == [
        ("sequence.start", "tips", "pending"),
        ("offer.grant", "welcome", "pending"),
    ]
    # The same page again changes nothing: the lead is already past that transition.
    await engine.send("page", anonymousId="a1", properties=LANDING)
    await engine.run()
    assert len(await engine.outbox(lead)) == 2


async def test_goal_moves_to_customer_and_counts_each_purchase(engine: Engine) -> None:
    await engine.send("page", userId="u1", properties=CATALOG)
    await engine.send("page", userId="u1", properties=LANDING)
    await engine.send("track", userId="u1", event="order_completed", properties={"revenue": 900})
    await engine.run(timedelta(days=40))
    await engine.send("track", userId="u1", event="order_completed", properties={"revenue": 300})
    await engine.run()
    lead = await engine.lead_id(user_id="u1")

    assert await engine.stages(lead) == [("customer", "active")]
    assert [row.value for row in await engine.rows(goals)] == [900.0, 300.0]
    assert ("email.send", "thanks", "pending") in await engine.outbox(lead)
    assert await engine.audiences(lead) == {"visitors": False}


async def test_exit_event_ends_the_run_from_any_stage_and_stops_its_sequences(
    engine: Engine,
) -> None:
    await engine.send("page", userId="u1", properties=CATALOG)
    await engine.send("page", userId="u1", properties=LANDING)
    await engine.run()
    await engine.send("track", userId="u1", event="opted_out")
    await engine.run()
    lead = await engine.lead_id(user_id="u1")

    assert await engine.stages(lead) == [("interested", "exited")]
    assert (await engine.history(lead))[-1] == ("interested", None, "exit")
    assert ("sequence.stop", "tips", "pending") in await engine.outbox(lead)


async def test_terminal_stage_completes_the_run_and_reentry_always_starts_a_new_one(
    engine: Engine,
) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()
    await engine.run(timedelta(hours=2))
    await engine.run(timedelta(days=14))
    lead = await engine.lead_id(anonymous_id="a1")
    assert await engine.stages(lead) == [("lost", "completed")]

    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()
    assert await engine.stages(lead) == [("lost", "completed"), ("visitor", "active")]


async def test_anonymous_visitor_who_identifies_keeps_state_and_history(engine: Engine) -> None:
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()
    anonymous = await engine.lead_id(anonymous_id="a1")

    await engine.send(
        "identify", anonymousId="a1", userId="u1", traits={"email": "Ann@Example.com"}
    )
    await engine.send("page", userId="u1", properties=LANDING)
    await engine.run()

    assert await engine.lead_id(user_id="u1") == anonymous
    assert await engine.stages(anonymous) == [("interested", "active")]
    lead = await engine.lead(anonymous)
    assert lead.email == "ann@example.com"
    assert lead.traits["email"] == "Ann@Example.com"


async def test_two_leads_of_one_person_merge_into_the_identified_one(engine: Engine) -> None:
    # A known customer on one device, an anonymous visitor on another.
    await engine.send("identify", userId="u1", traits={"first_name": "Ann"})
    await engine.send("page", anonymousId="phone", properties=CATALOG)
    await engine.run(timedelta(minutes=5))
    survivor = await engine.lead_id(user_id="u1")
    absorbed = await engine.lead_id(anonymous_id="phone")
    assert survivor != absorbed

    await engine.send("identify", userId="u1", anonymousId="phone")
    await engine.send("page", anonymousId="phone", properties=LANDING)
    await engine.run()

    assert await engine.lead_id(anonymous_id="phone") == survivor
    assert await engine.stages(survivor) == [("interested", "active")]
    assert (await engine.lead(absorbed)).merged_into == survivor
    assert (await engine.lead(survivor)).traits["first_name"] == "Ann"


async def test_alias_merges_the_previous_id_into_the_user(engine: Engine) -> None:
    await engine.send("page", anonymousId="old", properties=CATALOG)
    await engine.send("identify", userId="u1")
    await engine.run()
    await engine.send("alias", previousId="old", userId="u1")
    await engine.run()

    survivor = await engine.lead_id(user_id="u1")
    assert await engine.lead_id(anonymous_id="old") == survivor
    assert await engine.stages(survivor) == [("visitor", "active")]


async def test_merge_of_two_active_runs_keeps_the_earlier_one(engine: Engine) -> None:
    await engine.send("page", userId="u1", properties=CATALOG)
    await engine.run(timedelta(minutes=10))
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.send("page", anonymousId="a1", properties=LANDING)
    await engine.run()
    survivor = await engine.lead_id(user_id="u1")

    await engine.send("identify", userId="u1", anonymousId="a1")
    await engine.run()

    assert sorted(await engine.stages(survivor)) == [
        ("interested", "exited"),
        ("visitor", "active"),
    ]
    assert ("interested", None, "merge") in await engine.history(survivor)


async def test_events_of_a_lead_are_applied_in_timestamp_order(engine: Engine) -> None:
    now = engine.clock.now()
    # The landing visit is received first but happened after the catalog visit.
    await engine.send("page", anonymousId="a1", properties=LANDING, timestamp=now.isoformat())
    await engine.send(
        "page",
        anonymousId="a1",
        properties=CATALOG,
        timestamp=(now - timedelta(minutes=1)).isoformat(),
    )
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    assert await engine.stages(lead) == [("interested", "active")]


async def test_late_event_is_applied_and_marked_late_in_the_history(engine: Engine) -> None:
    start = engine.clock.now()
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run(timedelta(minutes=10))
    await engine.send("page", anonymousId="a1", properties={"path": "/about"})
    await engine.run(timedelta(minutes=10))
    # Sent from a phone that was offline: it happened 5 minutes after entry.
    await engine.send(
        "page",
        anonymousId="a1",
        properties=LANDING,
        timestamp=(start + timedelta(minutes=5)).isoformat(),
    )
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    (row,) = [r for r in await engine.rows(transitions) if r.to_stage == "interested"]
    assert row.cause["late"] is True
    assert row.cause["timestamp"] == (start + timedelta(minutes=5)).isoformat().replace(
        "+00:00", "Z"
    )
    assert await engine.stages(lead) == [("interested", "active")]


async def test_backlog_of_old_events_fires_timeouts_in_between(engine: Engine) -> None:
    now = engine.clock.now()
    await engine.send(
        "page",
        anonymousId="a1",
        properties=CATALOG,
        timestamp=(now - timedelta(days=3)).isoformat(),
    )
    await engine.send(
        "page",
        anonymousId="a1",
        properties=LANDING,
        timestamp=(now - timedelta(days=1)).isoformat(),
    )
    await engine.run()
    lead = await engine.lead_id(anonymous_id="a1")

    assert await engine.history(lead) == [
        (None, "visitor", "entry"),
        ("visitor", "retarget", "timer"),
        ("retarget", "interested", "event"),
    ]


async def test_repeated_message_id_is_stored_and_applied_once(engine: Engine) -> None:
    for _ in range(3):
        await engine.send("page", anonymousId="a1", properties=CATALOG, messageId="m-1")
    await engine.run()

    assert len(await engine.rows(events)) == 1
    assert len(await engine.rows(transitions)) == 1


async def test_every_event_is_marked_processed(engine: Engine) -> None:
    for index in range(20):
        await engine.send("track", anonymousId=f"a{index % 3}", event="viewed")
    await engine.run()

    assert await engine.pending_events() == 0
    assert all(row.error is None for row in await engine.rows(events))


async def test_outbox_rows_carry_an_idempotency_key_per_enrollment_and_entry(
    engine: Engine,
) -> None:
    await engine.send("page", userId="u1", properties=CATALOG)
    await engine.send("page", userId="u1", properties=LANDING)
    await engine.run()

    keys = [row.idempotency_key for row in await engine.rows(outbox)]
    assert len(keys) == len(set(keys)) == 2


async def test_a_lead_the_machine_fails_on_is_set_aside_and_others_go_on(engine: Engine) -> None:
    await engine.send("page", anonymousId="broken", properties=CATALOG)
    await engine.send("page", anonymousId="fine", properties=CATALOG)
    await engine.run()
    broken = await engine.lead_id(anonymous_id="broken")
    async with engine.runtime.db.write() as connection:
        # A stored timer pointing at a transition the stage does not have.
        await connection.execute(
            timers.update().where(timers.c.lead_id == broken).values(transition=99)
        )
    await engine.send("page", anonymousId="broken", properties={"path": "/about"})

    await engine.run(timedelta(hours=2))

    fine = await engine.lead_id(anonymous_id="fine")
    assert await engine.stages(fine) == [("retarget", "active")]
    assert await engine.stages(broken) == [("visitor", "active")]
    (failed,) = [row for row in await engine.rows(events) if row.error is not None]
    assert failed.lead_id == broken and failed.processed_at is not None
    (postponed,) = await engine.timers(broken)
    assert postponed.due_at > engine.clock.now()


async def test_a_timeout_waits_for_the_events_a_full_batch_left_out(engine: Engine) -> None:
    start = engine.clock.now()
    await engine.send("page", anonymousId="a1", properties=CATALOG)
    await engine.run()
    # Received before the timeout was due, processed three hours later, three at a time.
    for minutes in (10, 20, 30):
        await engine.send(
            "page",
            anonymousId="a1",
            properties={"path": "/about"},
            timestamp=(start + timedelta(minutes=minutes)).isoformat(),
        )
    await engine.send(
        "page",
        anonymousId="a1",
        properties=LANDING,
        timestamp=(start + timedelta(hours=1)).isoformat(),
    )
    engine.clock.advance(timedelta(hours=3))
    processor = Processor(engine.runtime.db, engine.runtime.book, engine.clock, batch_events=3)
    while await processor.process_events() + await processor.process_due_timers():
        pass

    lead = await engine.lead_id(anonymous_id="a1")
    assert await engine.history(lead) == [
        (None, "visitor", "entry"),
        ("visitor", "interested", "event"),
    ]
