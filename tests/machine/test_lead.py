"""`advance()`: a lead's events and timers, merged in time order across its journeys.

The `Driver` keeps timers between calls the way the database does, so these tests
read like the life of one lead on a virtual clock.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from engine.journey.model import Journey
from engine.machine.book import JourneyBook
from engine.machine.lead import Lead, PendingTimer, advance
from engine.machine.values import (
    AddToAudience,
    ChannelAction,
    ReachGoal,
    SetTrait,
    StartTimer,
)

from .support import CATALOG, FACEBOOK, T0, Driver, at, doors, doors_stages, journey, of_type

DOORS = doors()
LANDING = {"path": "/landing/spring"}


def doors_lead() -> Driver:
    """A lead that entered `doors` from the catalog at T0."""
    driver = Driver.of(DOORS)
    driver.send("page", T0, properties=CATALOG)
    return driver


# --- timeouts ------------------------------------------------------------------------------------


def test_timeout_moves_lead_to_retargeting_when_no_visit_within_2h() -> None:
    driver = doors_lead()

    driver.run_until(at(hours=2))

    assert driver.path("doors") == ["first_contact", "retargeting"]
    line = driver.history("doors")[-1]
    assert (line.at, line.cause.kind, line.cause.after) == (at(hours=2), "timer", "2h")
    assert AddToAudience("catalog_abandoners") in driver.effects("doors")


def test_timeout_does_not_fire_before_it_is_due() -> None:
    driver = doors_lead()

    outcome = driver.run_until(at(hours=2, seconds=-1))

    assert outcome.effects == ()
    assert driver.stage("doors") == "first_contact"
    assert driver.pending() == [("doors", "first_contact", at(hours=2))]


def test_visit_within_2h_cancels_the_timeout() -> None:
    driver = doors_lead()

    driver.send("page", at(hours=1), context=FACEBOOK)
    driver.run_until(at(days=30))

    assert driver.path("doors") == ["first_contact", "landing"]
    assert driver.pending() == []


def test_leaving_a_stage_voids_its_timers() -> None:
    driver = doors_lead()
    (timer,) = driver.stored.values()

    outcome = driver.send("page", at(hours=1), context=FACEBOOK)
    assert ("doors", 1) in outcome.cancelled  # the database deletes the stored timer
    # even a copy of it that was already claimed and is handed in late does nothing
    late = advance(driver.book, driver.lead, [], [timer], at(hours=3))

    assert late.fired == (timer.id,)
    assert late.effects == ()
    assert late.lead.enrollments["doors"].stage == "landing"


def test_void_timer_handed_in_does_not_move_the_lead_clock() -> None:
    driver = doors_lead()
    (stale,) = driver.stored.values()
    driver.send("page", at(hours=1), context=FACEBOOK)  # to landing: the 2h timer is void

    swept = advance(driver.book, driver.lead, [], [stale], at(hours=3))
    assert swept.fired == (stale.id,)
    assert swept.lead.watermark == at(hours=1)
    driver.lead = swept.lead
    driver.send("catalog_requested", at(hours=1, minutes=30))  # before the void timer's due

    line = driver.history("doors")[-1]
    assert (line.to_stage, line.at, line.cause.late) == (
        "nurturing",
        at(hours=1, minutes=30),
        False,
    )


def test_timeout_due_exactly_at_until_fires_before_the_event_of_that_instant() -> None:
    driver = Driver.of(DOORS)
    backlog = [
        driver.event("page", T0, properties=CATALOG),
        driver.event("page", at(hours=2), context=FACEBOOK),  # the last event: until is 2h
    ]

    outcome = driver.deliver(backlog)

    assert driver.path("doors") == ["first_contact", "retargeting"]
    assert [(t.stage, t.due_at) for t in outcome.timers] == [("retargeting", at(days=14, hours=2))]


def test_timeout_due_after_until_is_returned_to_store() -> None:
    driver = Driver.of(DOORS)

    outcome = driver.send("page", T0, properties=CATALOG)

    assert [(t.stage, t.epoch, t.transition, t.due_at, t.id) for t in outcome.timers] == [
        ("first_contact", 1, 1, at(hours=2), None)
    ]
    assert outcome.fired == ()


def test_stored_timer_is_consumed_when_it_fires() -> None:
    driver = doors_lead()
    (timer_id,) = driver.stored

    outcome = driver.run_until(at(hours=2))

    assert outcome.fired == (timer_id,)
    assert [(t.stage, t.due_at) for t in outcome.timers] == [("retargeting", at(days=14, hours=2))]


def test_timeouts_chain_within_one_call() -> None:
    driver = doors_lead()

    driver.run_until(at(days=30))

    assert driver.path("doors") == ["first_contact", "retargeting", "lost"]
    assert [line.at for line in driver.history("doors")] == [T0, at(hours=2), at(days=14, hours=2)]
    assert driver.enrollment("doors").state == "completed"
    assert driver.pending() == []


def test_backlog_fires_timeouts_between_old_events_in_order() -> None:
    driver = Driver.of(DOORS)
    backlog = [
        driver.event("page", T0, properties=CATALOG),
        # 3 hours later: the 2h timeout is due between the two events
        driver.event("page", at(hours=3), properties=LANDING, context=FACEBOOK),
        driver.event("catalog_requested", at(hours=4)),
    ]

    driver.deliver(backlog, until=at(days=1))

    history = driver.history("doors")
    assert [(line.from_stage, line.to_stage, line.at) for line in history] == [
        (None, "first_contact", T0),
        ("first_contact", "retargeting", at(hours=2)),
        ("retargeting", "landing", at(hours=3)),  # by the /landing path, not the facebook source
        ("landing", "nurturing", at(hours=4)),
    ]
    assert [line.cause.kind for line in history] == ["entry", "timer", "event", "event"]


def test_backlog_in_one_call_is_the_same_as_live_delivery() -> None:
    live = Driver.of(DOORS)
    batch = Driver.of(DOORS)
    moments: list[tuple[str, datetime, dict[str, Any]]] = [
        ("page", T0, CATALOG),
        ("page", at(hours=3), LANDING),
        ("catalog_requested", at(hours=4), {}),
        ("offer.expired", at(days=5, hours=4), {"offer": "free_install"}),
        ("order_completed", at(days=50), {"revenue": 990}),
    ]

    for name, when, properties in moments:
        live.send(name, when, properties=properties)
    batch.deliver(
        [batch.event(name, when, properties=properties) for name, when, properties in moments]
    )

    assert batch.log == live.log
    assert batch.path("doors") == [
        "first_contact",
        "retargeting",
        "landing",
        "nurturing",
        "cooling",
        "lost",
    ]
    # the order of day 50 comes after the 30 days in cooling ran out: a goal, no move
    assert of_type(batch.effects("doors"), ReachGoal)[-1].value == 990.0


def test_timer_and_event_same_instant_order() -> None:
    driver = doors_lead()

    # the facebook visit arrives exactly when the 2h timeout is due: the timer goes first
    driver.send("page", at(hours=2), context=FACEBOOK)

    assert driver.path("doors") == ["first_contact", "retargeting"]


def test_events_of_the_same_instant_apply_in_arrival_order() -> None:
    j = journey(
        [
            {"id": "a", "transitions": [{"on": "x", "to": "b"}, {"on": "y", "to": "c"}]},
            {"id": "b", "transitions": [{"on": "y", "to": "d"}]},
            {"id": "c"},
            {"id": "d"},
        ]
    )
    driver = Driver.of(j)
    go, x, y = driver.event("go", T0), driver.event("x", T0), driver.event("y", T0)

    driver.deliver([y, x, go])  # the list order is not the arrival order

    assert driver.path("j") == ["a", "b", "d"]


def test_events_apply_in_timestamp_order_not_list_order() -> None:
    driver = Driver.of(DOORS)
    events = [
        driver.event("catalog_requested", at(hours=4)),
        driver.event("page", at(hours=1), context=FACEBOOK),
        driver.event("page", T0, properties=CATALOG),
    ]

    driver.deliver(events)

    assert driver.path("doors") == ["first_contact", "landing", "nurturing"]
    assert not any(line.cause.late for line in driver.history("doors"))


def test_timeouts_due_at_the_same_instant_fire_in_transition_order() -> None:
    j = journey(
        [
            {
                "id": "wait",
                "transitions": [{"after": "1h", "to": "first"}, {"after": "60m", "to": "second"}],
            },
            {"id": "first"},
            {"id": "second"},
        ]
    )
    for order in (list, lambda timers: list(reversed(timers))):
        inline = Driver.of(j, timer_order=order)
        inline.deliver([inline.event("go", T0)], until=at(hours=1))
        stored = Driver.of(j, timer_order=order)
        stored.send("go", T0)
        stored.run_until(at(hours=1))

        assert inline.path("j") == stored.path("j") == ["wait", "first"]


def test_timeouts_of_two_journeys_due_at_the_same_instant_fire_in_journey_order() -> None:
    a = journey(
        [
            {"id": "wait", "transitions": [{"after": "1h", "to": "set"}]},
            {"id": "set", "on_enter": [{"trait.set": {"tier": "a"}}]},
        ],
        id="a",
    )
    b = journey(
        [
            {"id": "wait", "transitions": [{"after": "1h", "to": "set"}]},
            {"id": "set", "on_enter": [{"trait.set": {"tier": "b"}}]},
        ],
        id="b",
    )
    for order in (list, lambda timers: list(reversed(timers))):
        driver = Driver.of(b, a, timer_order=order)
        driver.send("go", T0)
        driver.run_until(at(hours=1))

        assert [
            (item.journey_id, item.effect)
            for item in driver.log
            if isinstance(item.effect, SetTrait)
        ] == [
            ("a", SetTrait("tier", "a")),
            ("b", SetTrait("tier", "b")),
        ]
        assert driver.lead.traits == {"tier": "b"}


# --- several journeys ----------------------------------------------------------------------------


def test_two_journeys_receive_the_same_event() -> None:
    other = journey(
        [
            {"id": "browsing", "transitions": [{"on": "catalog_requested", "to": "lead"}]},
            {"id": "lead"},
        ],
        id="catalog_fans",
        entry={"on": "page", "where": {"properties.path": {"startswith": "/catalog"}}},
    )
    driver = Driver.of(DOORS, other)

    driver.send("page", T0, properties=CATALOG)
    driver.send("page", at(hours=1), context=FACEBOOK)
    driver.send("catalog_requested", at(hours=2))

    assert driver.path("doors") == ["first_contact", "landing", "nurturing"]
    assert driver.path("catalog_fans") == ["browsing", "lead"]


def test_an_event_moves_a_lead_at_most_one_stage_per_journey() -> None:
    chain: list[dict[str, Any]] = [
        {"id": "a", "transitions": [{"on": "x", "to": "b"}]},
        {"id": "b", "transitions": [{"on": "x", "to": "c"}]},
        {"id": "c", "transitions": [{"on": "x", "to": "d"}]},
        {"id": "d"},
    ]
    one, two = journey(chain, id="one"), journey(chain, id="two", entry={"on": "x"})
    driver = Driver.of(one, two)
    driver.send("go", T0)

    driver.send("x", at(minutes=1))

    assert driver.path("one") == ["a", "b"]
    assert driver.path("two") == ["a"]  # entered by x, not moved on by it


def test_journeys_are_independent_runs() -> None:
    short = journey(
        [
            {"id": "a", "transitions": [{"on": "stop", "to": "end"}]},
            {"id": "end", "terminal": True},
        ],
        id="short",
    )
    driver = Driver.of(DOORS, short)
    driver.send("page", T0, properties=CATALOG)
    driver.send("go", T0)

    driver.send("stop", at(minutes=5))
    driver.run_until(at(hours=2))

    assert driver.enrollment("short").state == "completed"
    assert driver.path("doors") == ["first_contact", "retargeting"]


# --- traits --------------------------------------------------------------------------------------

VIP = journey(
    [
        {
            "id": "browsing",
            "transitions": [{"on": "x", "where": {"traits.plan": "vip"}, "to": "vip"}],
        },
        {"id": "vip"},
    ],
    id="vip",
)


def test_identify_traits_visible_to_traits_where() -> None:
    driver = Driver.of(VIP)
    driver.send("go", T0)

    driver.send("x", at(minutes=1))
    driver.send("identify", at(minutes=2), traits={"plan": "vip", "email": "a@example.com"})
    driver.send("x", at(minutes=3))

    assert driver.path("vip") == ["browsing", "vip"]
    assert driver.history("vip")[-1].at == at(minutes=3)
    assert driver.lead.traits == {"plan": "vip", "email": "a@example.com"}


def test_traits_of_an_event_apply_to_that_event() -> None:
    j = journey([{"id": "start"}], entry={"on": "signup", "where": {"traits.country": "DE"}})
    driver = Driver.of(j)

    driver.send("signup", T0, traits={"country": "DE"})

    assert driver.path("j") == ["start"]


def test_trait_set_visible_to_later_events() -> None:
    j = journey(
        [
            {
                "id": "a",
                "on_enter": [{"trait.set": {"plan": "vip"}}],
                "transitions": [{"on": "x", "where": {"traits.plan": "vip"}, "to": "b"}],
            },
            {"id": "b"},
        ]
    )
    driver = Driver.of(j)

    driver.send("go", T0)
    driver.send("x", at(minutes=1))

    assert driver.path("j") == ["a", "b"]
    assert driver.lead.traits == {"plan": "vip"}


def test_trait_set_by_a_timeout_is_visible_to_the_next_event() -> None:
    j = journey(
        [
            {"id": "a", "transitions": [{"after": "1h", "to": "b"}]},
            {"id": "b", "on_enter": [{"trait.set": {"plan": "vip"}}]},
        ]
    )
    driver = Driver.of(j, VIP)
    driver.send("go", T0)

    driver.send("x", at(hours=1))  # the timeout of the same instant goes first

    assert driver.path("vip") == ["browsing", "vip"]


def test_trait_set_by_one_journey_is_not_seen_by_another_on_the_same_event() -> None:
    setter = journey(
        [
            {"id": "a", "transitions": [{"on": "x", "to": "b"}]},
            {"id": "b", "on_enter": [{"trait.set": {"plan": "vip"}}]},
        ],
        id="a_setter",
    )
    driver = Driver.of(setter, VIP)
    driver.send("go", T0)

    driver.send("x", at(minutes=1))  # each journey sees the traits the event arrived with
    assert driver.path("vip") == ["browsing"]
    driver.send("x", at(minutes=2))
    assert driver.path("vip") == ["browsing", "vip"]


# --- late events ---------------------------------------------------------------------------------


def test_late_event_is_marked_late_in_the_cause() -> None:
    driver = doors_lead()
    driver.send("page", at(hours=1, minutes=30), properties={"path": "/about"})

    driver.send("page", at(hours=1), context=FACEBOOK)  # older than what the lead reached

    line = driver.history("doors")[-1]
    assert (line.to_stage, line.at, line.cause.late) == ("landing", at(hours=1, minutes=30), True)
    assert line.cause.timestamp == at(hours=1)


def test_late_event_does_not_undo_a_timeout_that_already_fired() -> None:
    driver = doors_lead()
    driver.run_until(at(hours=3))

    driver.send("page", at(hours=1), context=FACEBOOK)

    assert driver.path("doors") == ["first_contact", "retargeting"]


def test_event_in_time_is_not_late() -> None:
    driver = doors_lead()

    driver.send("page", at(hours=1), context=FACEBOOK)

    assert driver.history("doors")[-1].cause.late is False
    assert driver.lead.watermark == at(hours=1)


# --- goals ---------------------------------------------------------------------------------------


def test_goal_is_recorded_for_each_purchase_with_its_value() -> None:
    driver = doors_lead()
    driver.send("page", at(hours=1), context=FACEBOOK)
    driver.send("catalog_requested", at(hours=2))

    driver.send("order_completed", at(days=1), properties={"revenue": 1290}, message_id="o1")
    driver.send("order_completed", at(days=90), properties={"revenue": 310}, message_id="o2")

    goals = of_type(driver.effects("doors"), ReachGoal)
    assert [(g.message_id, g.at, g.value) for g in goals] == [
        ("o1", at(days=1), 1290.0),
        ("o2", at(days=90), 310.0),
    ]
    assert driver.stage("doors") == "customer"
    assert [item.entry_no for item in driver.log if isinstance(item.effect, ReachGoal)] == [1, 1]


def test_goal_after_completion_still_counts() -> None:
    driver = doors_lead()
    driver.run_until(at(days=15))
    assert driver.enrollment("doors").state == "completed"

    driver.send("order_completed", at(days=20), properties={"revenue": 500}, message_id="o1")

    assert of_type(driver.effects("doors"), ReachGoal) == [ReachGoal("o1", at(days=20), 500.0)]


def test_goal_of_a_lead_never_enrolled_is_not_counted() -> None:
    driver = Driver.of(DOORS)

    outcome = driver.send("order_completed", T0, properties={"revenue": 500})

    assert outcome.effects == ()
    assert driver.lead.enrollments == {}


# --- reentry -------------------------------------------------------------------------------------


def test_reentry_always_starts_a_new_enrollment_with_its_own_history() -> None:
    j = journey(
        [
            {
                "id": "a",
                "on_enter": [{"email.send": "hi"}],
                "transitions": [{"after": "1d", "to": "end"}],
            },
            {"id": "end", "terminal": True},
        ],
        entry={"on": "go", "reentry": "always"},
    )
    driver = Driver.of(j)
    driver.send("go", T0)
    driver.send("go", at(hours=1))  # still active: ignored

    driver.send("go", at(days=2))

    assert [line.to_stage for line in driver.history("j", 1)] == ["a", "end"]
    assert [line.to_stage for line in driver.history("j", 2)] == ["a"]
    sends = [
        (item.entry_no, item.effect)
        for item in driver.log
        if isinstance(item.effect, ChannelAction)
    ]
    assert sends == [
        (1, ChannelAction("email.send", "hi", "1.0")),
        (2, ChannelAction("email.send", "hi", "1.0")),
    ]


def test_exit_cancels_stored_timers_of_the_enrollment() -> None:
    driver = doors_lead()

    outcome = driver.send("email.unsubscribed", at(hours=1))
    driver.run_until(at(days=60))

    assert ("doors", 1) in outcome.cancelled
    assert driver.pending() == []
    assert driver.path("doors") == ["first_contact", None]


# --- versions ------------------------------------------------------------------------------------

V2 = doors(
    version=2,
    stages=doors_stages(
        first_contact={
            "transitions": [
                {"on": "page", "where": {"context.campaign.source": "facebook"}, "to": "landing"},
                {"after": "3h", "to": "retargeting"},
            ]
        },
    ),
)


def book_of(*versions: Journey, retired: frozenset[str] = frozenset()) -> JourneyBook:
    return JourneyBook(
        current={versions[-1].id: versions[-1]},
        versions={(j.id, j.version): j for j in versions},
        retired=retired,
    )


def test_lead_on_an_old_version_is_upgraded_at_its_next_input_and_timers_replanned() -> None:
    driver = doors_lead()
    (old_timer,) = driver.stored.values()
    driver.book = book_of(DOORS, V2)

    driver.run_until(at(hours=2))  # the old 2h timer is handed in: void now

    assert old_timer.id not in driver.stored
    assert driver.enrollment("doors").version == 2
    assert driver.path("doors") == ["first_contact", "first_contact"]
    assert driver.history("doors")[-1].cause.kind == "version"
    assert driver.pending() == [("doors", "first_contact", at(hours=3))]
    driver.run_until(at(hours=3))
    assert driver.path("doors")[-1] == "retargeting"


def test_lead_whose_stage_is_gone_keeps_running_on_its_old_version() -> None:
    v2 = doors(
        version=2,
        stages=doors_stages(
            retargeting=None, first_contact={"transitions": [{"on": "page", "to": "landing"}]}
        ),
    )
    driver = doors_lead()
    driver.run_until(at(hours=2))
    driver.book = book_of(DOORS, v2)

    driver.run_until(at(days=15))

    assert driver.enrollment("doors").version == 1
    assert driver.path("doors") == ["first_contact", "retargeting", "lost"]


def test_entry_event_of_a_new_version_leaves_a_run_on_the_old_one_alone() -> None:
    v2 = doors(
        version=2,
        entry={"on": "catalog_opened"},
        stages=doors_stages(
            retargeting=None, first_contact={"transitions": [{"on": "page", "to": "landing"}]}
        ),
    )
    driver = doors_lead()
    driver.run_until(at(hours=2))
    driver.book = book_of(DOORS, v2)
    before = len(driver.log)

    driver.send("catalog_opened", at(hours=3))  # v1 does not listen to it

    assert driver.enrollment("doors").version == 1
    assert driver.stage("doors") == "retargeting"
    assert len(driver.log) == before
    newcomer = Driver(driver.book)
    newcomer.send("catalog_opened", at(hours=3))
    assert newcomer.enrollment("doors").version == 2


def test_new_leads_enter_the_current_version() -> None:
    driver = Driver(book_of(DOORS, V2))

    driver.send("page", T0, properties=CATALOG)

    assert driver.enrollment("doors").version == 2
    assert driver.pending() == [("doors", "first_contact", at(hours=3))]


def test_retired_journey_keeps_its_leads_running_and_admits_no_one() -> None:
    driver = doors_lead()
    driver.book = book_of(DOORS, retired=frozenset({"doors"}))
    newcomer = Driver(driver.book)

    driver.run_until(at(hours=2))
    newcomer.send("page", T0, properties=CATALOG)

    assert driver.path("doors") == ["first_contact", "retargeting"]
    assert newcomer.lead.enrollments == {}


# --- the outcome ---------------------------------------------------------------------------------


def test_advance_does_not_change_its_inputs() -> None:
    driver = doors_lead()
    lead = driver.lead
    snapshot = (dict(lead.traits), lead.watermark, dict(lead.enrollments))
    events = [
        driver.event("identify", at(hours=1), traits={"plan": "vip"}),
        driver.event("page", at(hours=1), context=FACEBOOK),
    ]
    timers = list(driver.stored.values())

    first = advance(driver.book, lead, events, timers, at(hours=5))
    second = advance(driver.book, lead, events, timers, at(hours=5))

    assert first == second
    assert (dict(lead.traits), lead.watermark, dict(lead.enrollments)) == snapshot


def test_outcome_effects_carry_their_enrollment_and_moment() -> None:
    driver = Driver.of(DOORS)

    outcome = driver.deliver([driver.event("page", T0, properties=CATALOG)], until=at(hours=3))

    rows = [
        (item.journey_id, item.entry_no, item.at, type(item.effect).__name__)
        for item in outcome.effects
    ]
    assert rows == [
        ("doors", 1, T0, "Transitioned"),
        ("doors", 1, T0, "AddToAudience"),
        ("doors", 1, T0, "StartTimer"),
        ("doors", 1, at(hours=2), "CancelTimers"),
        ("doors", 1, at(hours=2), "Transitioned"),
        ("doors", 1, at(hours=2), "AddToAudience"),
        ("doors", 1, at(hours=2), "StartTimer"),
    ]
    assert outcome.lead.watermark == at(hours=2)


def test_timer_started_and_fired_in_one_call_is_not_stored() -> None:
    driver = Driver.of(DOORS)

    outcome = driver.deliver([driver.event("page", T0, properties=CATALOG)], until=at(hours=3))

    assert [(t.stage, t.due_at) for t in outcome.timers] == [("retargeting", at(days=14, hours=2))]
    assert of_type([item.effect for item in outcome.effects], StartTimer)[0].due_at == at(hours=2)


def test_outcome_lists_the_enrollments_it_changed() -> None:
    driver = doors_lead()

    unchanged = driver.send("page", at(minutes=5), properties={"path": "/about"})
    changed = driver.send("page", at(minutes=10), context=FACEBOOK)

    assert unchanged.changed == ()
    assert [(e.journey_id, e.stage) for e in changed.changed] == [("doors", "landing")]


def test_pending_timer_of_an_unknown_enrollment_is_consumed_quietly() -> None:
    stray = PendingTimer("doors", 1, "first_contact", 1, 1, T0, id=41)

    outcome = advance(JourneyBook.of([DOORS]), Lead({}, None, {}), [], [stray], at(hours=1))

    assert (outcome.fired, outcome.effects) == ((41,), ())
