"""`step()`, `upgrade()` and `leave()`: what one input does to one enrollment.

Each test states one rule of the journey machine (SPEC section 2) on the doors map
or a smaller one built for the rule.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import pytest

from engine.journey.model import Journey
from engine.machine.step import leave, step, upgrade
from engine.machine.values import (
    AddToAudience,
    CancelTimers,
    Cause,
    ChannelAction,
    Enrollment,
    ReachGoal,
    RemoveFromAudience,
    SetTrait,
    StartTimer,
    Step,
    TimerFired,
    Transitioned,
)

from .support import (
    CATALOG,
    DOORS_SPEC,
    FACEBOOK,
    T0,
    at,
    doors,
    doors_stages,
    event,
    journey,
    of_type,
    only,
)

DOORS = doors()


def enter(j: Journey = DOORS, when: datetime = T0) -> Enrollment:
    """A lead that has just entered `j` by its entry event."""
    name = j.entry.on
    result = step(j, None, event(name, when, properties=CATALOG), when)
    assert result.enrollment is not None
    return result.enrollment


def walk(j: Journey, enrollment: Enrollment, *names: str, when: datetime = T0) -> Enrollment:
    """The enrollment after the events `names`, each with no properties."""
    for name in names:
        result = step(j, enrollment, event(name, when), when)
        assert result.enrollment is not None
        enrollment = result.enrollment
    return enrollment


def at_stage(stage: str, when: datetime = T0) -> Enrollment:
    """A doors lead that entered at `when` and was moved to `stage` (its epoch is 2)."""
    return Enrollment(
        journey_id="doors",
        version=1,
        entry_no=1,
        stage=stage,
        state="active",
        epoch=2,
        entered_at=when,
        stage_entered_at=when,
    )


def nurtured(when: datetime = T0) -> Enrollment:
    """A doors lead in `nurturing`, its door_tips sequence running."""
    landed = step(DOORS, enter(DOORS, when), event("page", when, context=FACEBOOK), when)
    assert landed.enrollment is not None
    return walk(DOORS, landed.enrollment, "catalog_requested", when=when)


def timer_of(enrollment: Enrollment, transition: int, due_at: datetime) -> TimerFired:
    return TimerFired(
        enrollment.journey_id,
        enrollment.entry_no,
        enrollment.stage,
        enrollment.epoch,
        transition,
        due_at,
    )


# --- entry ---------------------------------------------------------------------------------------


def test_entry_event_enrolls_lead_at_first_stage() -> None:
    page = event("page", T0, properties=CATALOG, message_id="m1")

    result = step(DOORS, None, page, T0)

    assert result.enrollment == Enrollment(
        journey_id="doors",
        version=1,
        entry_no=1,
        stage="first_contact",
        state="active",
        epoch=1,
        entered_at=T0,
        stage_entered_at=T0,
    )
    entry = Cause("entry", event="page", message_id="m1", timestamp=T0)
    assert result.effects == (
        Transitioned(None, "first_contact", T0, entry),
        AddToAudience("site_visitors"),
        StartTimer("first_contact", 1, 1, at(hours=2)),
    )


def test_entry_where_must_match() -> None:
    assert step(DOORS, None, event("page", properties={"path": "/about"}), T0) == Step(None)


def test_events_other_than_the_entry_event_do_not_enroll() -> None:
    for name in ("catalog_requested", "email.unsubscribed", "order_completed"):
        assert step(DOORS, None, event(name, properties=CATALOG), T0) == Step(None)


def test_entering_is_at_now_not_at_the_event_timestamp() -> None:
    late_page = event("page", T0, properties=CATALOG, late=True)

    result = step(DOORS, None, late_page, at(hours=5))

    assert result.enrollment is not None
    assert result.enrollment.entered_at == at(hours=5)
    assert only(result.effects, StartTimer).due_at == at(hours=7)


def test_entering_a_terminal_first_stage_completes_at_once() -> None:
    j = journey([{"id": "done", "terminal": True, "on_enter": [{"email.send": "hello"}]}])

    result = step(j, None, event("go"), T0)

    assert result.enrollment is not None
    assert result.enrollment.state == "completed"
    assert result.enrollment.ended_at == T0
    assert only(result.effects, ChannelAction) == ChannelAction("email.send", "hello", "1.0")


def test_active_enrollment_is_not_reentered() -> None:
    j = doors(entry={**DOORS_SPEC["entry"], "reentry": "always"})
    enrollment = enter(j)

    again = step(j, enrollment, event("page", at(minutes=5), properties=CATALOG), at(minutes=5))

    assert again == Step(enrollment)


def test_reentry_never_ignores_a_second_entry_event() -> None:
    j = journey([{"id": "only", "terminal": True}])  # reentry: never is the default
    first = enter(j)
    assert first.state == "completed"

    assert step(j, first, event("go", at(days=400)), at(days=400)) == Step(first)


def test_reentry_never_holds_after_an_exit_too() -> None:
    exited = step(DOORS, enter(), event("email.unsubscribed"), T0).enrollment
    assert exited is not None
    assert exited.state == "exited"

    later = at(days=90)
    assert step(DOORS, exited, event("page", later, properties=CATALOG), later) == Step(exited)


def test_reentry_always_reenters_after_completion() -> None:
    j = journey(
        [
            {"id": "start", "transitions": [{"on": "buy", "to": "done"}]},
            {"id": "done", "terminal": True},
        ],
        entry={"on": "go", "reentry": "always"},
    )
    completed = walk(j, enter(j), "buy")
    assert completed.state == "completed"

    result = step(j, completed, event("go", at(minutes=1)), at(minutes=1))

    assert result.enrollment == Enrollment(
        journey_id="j",
        version=1,
        entry_no=2,
        stage="start",
        state="active",
        epoch=1,
        entered_at=at(minutes=1),
        stage_entered_at=at(minutes=1),
    )
    assert only(result.effects, Transitioned).from_stage is None


def test_reentry_after_30d_waits_30_days_from_previous_entry() -> None:
    j = journey(
        [
            {"id": "start", "transitions": [{"on": "buy", "to": "done"}]},
            {"id": "done", "terminal": True},
        ],
        entry={"on": "go", "reentry": "after 30d"},
    )
    completed = walk(j, enter(j, T0), "buy", when=at(days=20))  # ended 20 days after entry

    too_soon = at(days=30) - timedelta(seconds=1)
    assert step(j, completed, event("go", too_soon), too_soon) == Step(completed)
    # 30 days after the previous *entry*, though only 10 after it ended
    reentered = step(j, completed, event("go", at(days=30)), at(days=30)).enrollment
    assert reentered is not None
    assert (reentered.entry_no, reentered.state, reentered.entered_at) == (2, "active", at(days=30))


# --- transitions ---------------------------------------------------------------------------------


def test_event_transition_moves_lead_and_cancels_timers_of_the_stage_left() -> None:
    visit = event("page", at(hours=1), context=FACEBOOK, message_id="m2")

    result = step(DOORS, enter(), visit, at(hours=1))

    assert result.enrollment is not None
    assert result.enrollment.stage == "landing"
    assert result.enrollment.epoch == 2
    assert result.enrollment.stage_entered_at == at(hours=1)
    assert result.enrollment.entered_at == T0
    cause = Cause("event", event="page", message_id="m2", timestamp=at(hours=1))
    assert result.effects == (
        CancelTimers(),
        Transitioned("first_contact", "landing", at(hours=1), cause, since=T0),
        RemoveFromAudience("catalog_abandoners"),
    )


def test_event_without_matching_transition_changes_nothing() -> None:
    enrollment = enter()
    for name, context in [
        ("page", {}),
        ("page", {"campaign": {"source": "google"}}),
        ("other", FACEBOOK),
    ]:
        assert step(DOORS, enrollment, event(name, context=context), T0) == Step(enrollment)


def test_first_matching_transition_wins() -> None:
    j = journey(
        [
            {
                "id": "start",
                "transitions": [
                    {"on": "x", "where": {"properties.p": 1}, "to": "one"},
                    {"on": "x", "to": "any"},
                    {"on": "x", "where": {"properties.p": 2}, "to": "two"},
                ],
            },
            {"id": "one"},
            {"id": "any"},
            {"id": "two"},
        ]
    )
    start = enter(j)

    def moved_to(properties: dict[str, Any]) -> str:
        result = step(j, start, event("x", properties=properties), T0)
        assert result.enrollment is not None
        return result.enrollment.stage

    assert moved_to({"p": 1}) == "one"
    assert moved_to({"p": 2}) == "any"
    assert moved_to({}) == "any"


def test_an_event_moves_a_lead_at_most_one_stage_per_journey() -> None:
    j = journey(
        [
            {"id": "a", "transitions": [{"on": "x", "to": "b"}]},
            {"id": "b", "transitions": [{"on": "x", "to": "c"}]},
            {"id": "c"},
        ],
        entry={"on": "x"},
    )
    entered = step(j, None, event("x"), T0)
    assert entered.enrollment is not None
    assert entered.enrollment.stage == "a"  # entering is the move: not on to b
    moved = step(j, entered.enrollment, event("x"), T0)
    assert moved.enrollment is not None
    assert moved.enrollment.stage == "b"
    assert len(of_type(moved.effects, Transitioned)) == 1


def test_doors_entry_visit_from_facebook_enters_without_skipping_to_landing() -> None:
    page = event("page", properties=CATALOG, context=FACEBOOK)

    result = step(DOORS, None, page, T0)

    assert result.enrollment is not None
    assert result.enrollment.stage == "first_contact"


def test_transition_to_the_same_stage_reenters_it() -> None:
    j = journey(
        [
            {
                "id": "loop",
                "on_enter": [{"email.send": "reminder"}],
                "transitions": [{"on": "poke", "to": "loop"}, {"after": "1d", "to": "loop"}],
            }
        ]
    )
    first = enter(j)

    result = step(j, first, event("poke", at(hours=3)), at(hours=3))

    assert result.enrollment is not None
    assert (result.enrollment.epoch, result.enrollment.stage_entered_at) == (2, at(hours=3))
    assert result.effects[0] == CancelTimers()
    assert only(result.effects, ChannelAction) == ChannelAction("email.send", "reminder", "2.0")
    assert only(result.effects, StartTimer) == StartTimer("loop", 2, 1, at(days=1, hours=3))


# --- where ---------------------------------------------------------------------------------------

MISSING = object()

WHERE_CASES: list[tuple[str, Any, Any, bool]] = [
    # (name, the where value for properties.v, properties.v or MISSING, matches)
    ("equality", 5, 5, True),
    ("equality int and float", 5, 5.0, True),
    ("equality other value", 5, 6, False),
    ("equality string is not number", 5, "5", False),
    ("equality missing", 5, MISSING, False),
    ("equality 1 is not true", 1, True, False),
    ("equality true is not 1", True, 1, False),
    ("equality null", None, None, True),
    ("equality null missing", None, MISSING, False),
    ("eq", {"eq": "gold"}, "gold", True),
    ("eq other", {"eq": "gold"}, "silver", False),
    ("eq 1 vs true", {"eq": 1}, True, False),
    ("eq true vs 1", {"eq": True}, 1, False),
    ("eq 0 vs false", {"eq": 0}, False, False),
    ("eq missing", {"eq": "gold"}, MISSING, False),
    ("ne", {"ne": "gold"}, "silver", True),
    ("ne same", {"ne": "gold"}, "gold", False),
    ("ne missing", {"ne": "gold"}, MISSING, True),
    ("ne 1 vs true", {"ne": 1}, True, True),
    ("in", {"in": ["a", "b"]}, "b", True),
    ("in not", {"in": ["a", "b"]}, "c", False),
    ("in missing", {"in": ["a", "b"]}, MISSING, False),
    ("in 1 vs true", {"in": [1, 2]}, True, False),
    ("not_in", {"not_in": ["a", "b"]}, "c", True),
    ("not_in listed", {"not_in": ["a", "b"]}, "a", False),
    ("not_in missing", {"not_in": ["a", "b"]}, MISSING, True),
    ("in strings vs a number", {"in": ["1", "2"]}, 1, False),
    ("in strings vs a list", {"in": ["a", "b"]}, ["a"], False),
    ("in strings vs a mapping", {"in": ["a", "b"]}, {"a": 1}, False),
    ("in mixed", {"in": ["a", 2]}, 2, True),
    ("not_in strings vs a number", {"not_in": ["1", "2"]}, 1, True),
    ("not_in strings vs a list", {"not_in": ["a"]}, ["a"], True),
    ("gt", {"gt": 100}, 150, True),
    ("gt equal", {"gt": 100}, 100, False),
    ("gt float", {"gt": 100}, 100.5, True),
    ("gt string vs number", {"gt": 100}, "150", False),
    ("gt bool", {"gt": 0}, True, False),
    ("gt null", {"gt": 0}, None, False),
    ("gt missing", {"gt": 0}, MISSING, False),
    ("gt strings", {"gt": "b"}, "c", True),
    ("gte", {"gte": 100}, 100, True),
    ("gte below", {"gte": 100}, 99.9, False),
    ("lt", {"lt": 100}, 99, True),
    ("lt equal", {"lt": 100}, 100, False),
    ("lt missing", {"lt": 100}, MISSING, False),
    ("lte", {"lte": 100}, 100, True),
    ("lte above", {"lte": 100}, 101, False),
    ("startswith", {"startswith": "/catalog"}, "/catalog/steel", True),
    ("startswith other", {"startswith": "/catalog"}, "/landing/catalog", False),
    ("startswith number", {"startswith": "1"}, 123, False),
    ("startswith missing", {"startswith": "/"}, MISSING, False),
    ("endswith", {"endswith": ".pdf"}, "doors.pdf", True),
    ("endswith other", {"endswith": ".pdf"}, "doors.pdf.html", False),
    ("contains substring", {"contains": "oor"}, "doors", True),
    ("contains no substring", {"contains": "win"}, "doors", False),
    ("contains list item", {"contains": "b"}, ["a", "b"], True),
    ("contains list 1 vs true", {"contains": True}, [1, 2], False),
    ("contains number in string", {"contains": 1}, "123", False),
    ("contains mapping", {"contains": "a"}, {"a": 1}, False),
    ("contains missing", {"contains": "a"}, MISSING, False),
    ("exists", {"exists": True}, 0, True),
    ("exists null", {"exists": True}, None, False),
    ("exists missing", {"exists": True}, MISSING, False),
    ("not exists missing", {"exists": False}, MISSING, True),
    ("not exists null", {"exists": False}, None, True),
    ("not exists present", {"exists": False}, "", False),
]


@pytest.mark.parametrize(
    ("expected", "value", "matches"),
    [case[1:] for case in WHERE_CASES],
    ids=[case[0] for case in WHERE_CASES],
)
def test_where_matchers(expected: Any, value: Any, matches: bool) -> None:
    j = journey(
        [
            {
                "id": "start",
                "transitions": [{"on": "x", "where": {"properties.v": expected}, "to": "hit"}],
            },
            {"id": "hit"},
        ]
    )
    properties = {} if value is MISSING else {"v": value}

    result = step(j, enter(j), event("x", properties=properties), T0)

    assert result.enrollment is not None
    assert (result.enrollment.stage == "hit") is matches


@pytest.mark.parametrize(
    ("properties", "matches"),
    [
        ({"order": {"total": 120}}, True),
        ({"order": {"total": 80}}, False),
        ({"order": 120}, False),  # a path through a non-mapping is missing
        ({"order": {}}, False),
        ({}, False),
    ],
)
def test_where_follows_nested_paths(properties: dict[str, Any], matches: bool) -> None:
    j = journey(
        [
            {
                "id": "start",
                "transitions": [
                    {"on": "x", "where": {"properties.order.total": {"gte": 100}}, "to": "hit"}
                ],
            },
            {"id": "hit"},
        ]
    )

    result = step(j, enter(j), event("x", properties=properties), T0)

    assert result.enrollment is not None
    assert (result.enrollment.stage == "hit") is matches


def test_where_keys_are_all_required() -> None:
    j = journey(
        [
            {
                "id": "start",
                "transitions": [
                    {
                        "on": "x",
                        "where": {
                            "properties.plan": "pro",
                            "context.campaign.source": {"in": ["google", "bing"]},
                            "traits.country": "DE",
                        },
                        "to": "hit",
                    }
                ],
            },
            {"id": "hit"},
        ]
    )
    start = enter(j)
    everything = {
        "properties": {"plan": "pro"},
        "context": {"campaign": {"source": "bing"}},
        "traits": {"country": "DE"},
    }

    def stage_after(**fields: Any) -> str:
        result = step(j, start, event("x", **fields), T0)
        assert result.enrollment is not None
        return result.enrollment.stage

    assert stage_after(**everything) == "hit"
    for left_out in everything:
        assert stage_after(**{k: v for k, v in everything.items() if k != left_out}) == "start"


def test_where_event_path_is_the_event_name() -> None:
    j = journey(
        [{"id": "start"}],
        entry={"on": "go", "where": {"event": "go"}},
    )
    assert step(j, None, event("go"), T0).enrollment is not None


# --- on_enter ------------------------------------------------------------------------------------


def test_on_enter_actions_become_effects_in_their_order() -> None:
    j = journey(
        [
            {"id": "start", "transitions": [{"on": "x", "to": "busy"}]},
            {
                "id": "busy",
                "on_enter": [
                    {"audience.add": ["a1", "a2"]},
                    {"email.send": "welcome"},
                    {"trait.set": {"tier": "gold", "score": 3}},
                    {"sequence.start": "tips"},
                    {"offer.grant": "discount"},
                    {"audience.remove": "a0"},
                    {"sequence.stop": "older"},
                ],
            },
        ]
    )

    result = step(j, enter(j), event("x"), T0)

    assert result.effects[2:] == (
        AddToAudience("a1"),
        AddToAudience("a2"),
        ChannelAction("email.send", "welcome", "2.1"),
        SetTrait("tier", "gold"),
        SetTrait("score", 3),
        ChannelAction("sequence.start", "tips", "2.3"),
        ChannelAction("offer.grant", "discount", "2.4"),
        RemoveFromAudience("a0"),
        ChannelAction("sequence.stop", "older", "2.6"),
    )


def test_on_enter_actions_have_keys_unique_per_stage_entry() -> None:
    j = journey(
        [
            {
                "id": "a",
                "on_enter": [{"email.send": "hello"}],
                "transitions": [{"on": "next", "to": "b"}],
            },
            {
                "id": "b",
                "on_enter": [{"email.send": "hello"}, {"offer.grant": "gift"}],
                "transitions": [{"on": "back", "to": "a"}, {"on": "again", "to": "b"}],
            },
        ]
    )
    enrollment = enter(j)
    keys = ["1.0"]  # entering a
    for name in ("next", "again", "back", "next", "again"):
        result = step(j, enrollment, event(name), T0)
        assert result.enrollment is not None
        enrollment = result.enrollment
        keys.extend(action.key for action in of_type(result.effects, ChannelAction))

    assert len(keys) == len(set(keys)) == 10
    # the same email in the same stage, entered again, is a new send
    assert keys[:3] == ["1.0", "2.0", "2.1"]


def test_sequence_started_is_remembered_by_the_enrollment() -> None:
    enrollment = nurtured()

    assert enrollment.stage == "nurturing"
    assert enrollment.sequences == ("door_tips",)


def test_sequence_stop_action_forgets_the_sequence() -> None:
    j = journey(
        [
            {
                "id": "a",
                "on_enter": [{"sequence.start": "tips"}],
                "transitions": [{"on": "x", "to": "b"}],
            },
            {
                "id": "b",
                "on_enter": [{"sequence.stop": "tips"}],
                "transitions": [{"on": "y", "to": "end"}],
            },
            {"id": "end", "terminal": True},
        ]
    )
    in_b = walk(j, enter(j), "x")
    assert in_b.sequences == ()

    done = step(j, in_b, event("y"), T0)

    assert of_type(done.effects, ChannelAction) == []  # nothing left to stop


# --- terminal stages and exits -------------------------------------------------------------------


def test_terminal_stage_completes_enrollment() -> None:
    cooling = at_stage("cooling")

    result = step(DOORS, cooling, timer_of(cooling, 1, at(days=30)), at(days=30))

    assert result.enrollment is not None
    assert result.enrollment.stage == "lost"
    assert result.enrollment.state == "completed"
    assert result.enrollment.ended_at == at(days=30)
    assert not result.enrollment.active
    assert of_type(result.effects, StartTimer) == []


def test_reaching_a_terminal_stage_stops_running_sequences() -> None:
    j = journey(
        [
            {
                "id": "a",
                "on_enter": [{"sequence.start": "tips"}, {"sequence.start": "news"}],
                "transitions": [{"on": "x", "to": "end"}],
            },
            {"id": "end", "terminal": True},
        ]
    )

    result = step(j, enter(j), event("x"), T0)

    assert result.enrollment is not None
    assert result.enrollment.sequences == ()
    stops = of_type(result.effects, ChannelAction)
    assert [(s.action, s.target) for s in stops] == [
        ("sequence.stop", "tips"),
        ("sequence.stop", "news"),
    ]
    assert len({s.key for s in stops} | {"1.0", "1.1"}) == 4


@pytest.mark.parametrize(
    "stage", ["first_contact", "retargeting", "landing", "cooling", "customer"]
)
def test_exit_event_ends_enrollment_from_any_stage(stage: str) -> None:
    enrollment = at_stage(stage)
    unsubscribed = event("email.unsubscribed", at(hours=1), message_id="u1")

    result = step(DOORS, enrollment, unsubscribed, at(hours=1))

    assert result.enrollment is not None
    assert result.enrollment.state == "exited"
    assert result.enrollment.stage == stage
    assert result.enrollment.ended_at == at(hours=1)
    cause = Cause("exit", event="email.unsubscribed", message_id="u1", timestamp=at(hours=1))
    leaves = tuple(RemoveFromAudience(name) for name in DOORS.audiences)
    assert len(leaves) == 2  # the lead leaves every audience of the journey it left
    assert result.effects == (
        CancelTimers(),
        Transitioned(stage, None, at(hours=1), cause, since=enrollment.stage_entered_at),
        *leaves,
    )


def test_exit_event_ends_enrollment_and_stops_sequences() -> None:
    enrollment = nurtured()

    result = step(DOORS, enrollment, event("email.unsubscribed", at(days=1)), at(days=1))

    assert result.enrollment is not None
    assert result.enrollment.state == "exited"
    assert result.enrollment.sequences == ()
    assert result.effects[0] == CancelTimers()
    line = only(result.effects, Transitioned)
    assert (line.from_stage, line.to_stage, line.cause.kind) == ("nurturing", None, "exit")
    (stop,) = of_type(result.effects, ChannelAction)
    assert (stop.action, stop.target) == ("sequence.stop", "door_tips")


def test_exit_rule_where_must_match() -> None:
    j = doors(exit=[{"on": "email.bounced", "where": {"properties.hard": True}}])
    enrollment = enter(j)

    soft = step(j, enrollment, event("email.bounced", properties={"hard": False}), T0)
    hard = step(j, enrollment, event("email.bounced", properties={"hard": True}), T0)

    assert soft == Step(enrollment)
    assert hard.enrollment is not None
    assert hard.enrollment.state == "exited"


def test_exit_wins_over_a_transition_on_the_same_event() -> None:
    j = doors(exit=[{"on": "page", "where": {"properties.path": "/unsubscribe"}}])

    result = step(
        j, enter(j), event("page", properties={"path": "/unsubscribe"}, context=FACEBOOK), T0
    )

    assert result.enrollment is not None
    assert result.enrollment.state == "exited"
    assert of_type(result.effects, Transitioned)[0].to_stage is None


def test_ended_enrollment_ignores_transitions_and_exits() -> None:
    exited = step(DOORS, enter(), event("email.unsubscribed"), T0).enrollment
    assert exited is not None

    for name, context in [("page", FACEBOOK), ("email.unsubscribed", {})]:
        assert step(DOORS, exited, event(name, at(hours=1), context=context), at(hours=1)) == Step(
            exited
        )


def test_leave_ends_the_enrollment_with_the_given_cause() -> None:
    enrollment = nurtured()
    merged = Cause("merge", detail="merged into lead 7")

    result = leave(enrollment, at(days=2), merged)

    assert result.enrollment is not None
    assert (result.enrollment.state, result.enrollment.ended_at) == ("exited", at(days=2))
    assert result.effects[:2] == (
        CancelTimers(),
        Transitioned("nurturing", None, at(days=2), merged, since=T0),
    )
    assert [a.target for a in of_type(result.effects, ChannelAction)] == ["door_tips"]


# --- timers --------------------------------------------------------------------------------------


def test_timer_of_the_current_stage_moves_the_lead() -> None:
    enrollment = enter()

    result = step(DOORS, enrollment, timer_of(enrollment, 1, at(hours=2)), at(hours=2))

    assert result.enrollment is not None
    assert result.enrollment.stage == "retargeting"
    assert result.effects[:2] == (
        CancelTimers(),
        Transitioned(
            "first_contact",
            "retargeting",
            at(hours=2),
            Cause("timer", timestamp=at(hours=2), after="2h"),
            since=T0,  # how long the lead was in the stage it left
        ),
    )
    assert StartTimer("retargeting", 2, 1, at(hours=2, days=14)) in result.effects


def test_timer_of_a_left_stage_is_void() -> None:
    entered = enter()
    stale = timer_of(entered, 1, at(hours=2))
    landed = step(
        DOORS, entered, event("page", at(hours=1), context=FACEBOOK), at(hours=1)
    ).enrollment
    assert landed is not None

    assert step(DOORS, landed, stale, at(hours=2)) == Step(landed)


def test_timer_of_an_earlier_entry_of_the_same_stage_is_void() -> None:
    j = journey(
        [
            {
                "id": "loop",
                "transitions": [{"on": "poke", "to": "loop"}, {"after": "1h", "to": "out"}],
            },
            {"id": "out"},
        ]
    )
    first = enter(j)
    stale = timer_of(first, 1, at(hours=1))
    poked = walk(j, first, "poke", when=at(minutes=30))

    assert step(j, poked, stale, at(hours=1)) == Step(poked)
    current = step(j, poked, timer_of(poked, 1, at(hours=1, minutes=30)), at(hours=1, minutes=30))
    assert current.enrollment is not None
    assert current.enrollment.stage == "out"


def test_timer_of_a_previous_enrollment_is_void() -> None:
    j = journey(
        [
            {"id": "a", "transitions": [{"on": "stop", "to": "end"}, {"after": "1d", "to": "b"}]},
            {"id": "b"},
            {"id": "end", "terminal": True},
        ],
        entry={"on": "go", "reentry": "always"},
    )
    first = enter(j)
    stale = timer_of(first, 1, at(days=1))
    second = step(j, walk(j, first, "stop"), event("go", at(hours=1)), at(hours=1)).enrollment
    assert second is not None
    assert (second.entry_no, second.stage, second.epoch) == (2, "a", 1)  # same stage and epoch

    assert step(j, second, stale, at(days=1)) == Step(second)


def test_timer_after_the_enrollment_ended_is_void() -> None:
    entered = enter()
    exited = step(DOORS, entered, event("email.unsubscribed"), T0).enrollment

    assert step(DOORS, exited, timer_of(entered, 1, at(hours=2)), at(hours=2)) == Step(exited)
    assert step(DOORS, None, timer_of(entered, 1, at(hours=2)), at(hours=2)) == Step(None)


# --- goals ---------------------------------------------------------------------------------------


def test_goal_is_recorded_with_value_and_counts_repeat_purchases() -> None:
    enrollment = nurtured()
    first = event("order_completed", at(days=1), properties={"revenue": 1290}, message_id="o1")
    second = event("order_completed", at(days=9), properties={"revenue": "310.50"}, message_id="o2")

    bought = step(DOORS, enrollment, first, at(days=1))
    again = step(DOORS, bought.enrollment, second, at(days=9))

    assert bought.effects[0] == ReachGoal("o1", at(days=1), 1290.0)
    assert bought.enrollment is not None
    assert bought.enrollment.stage == "customer"
    assert again.effects == (ReachGoal("o2", at(days=9), 310.5),)
    assert again.enrollment == bought.enrollment


@pytest.mark.parametrize("revenue", [None, "n/a", True, {"amount": 5}])
def test_goal_without_a_numeric_value_still_counts(revenue: Any) -> None:
    order = event("order_completed", properties={} if revenue is None else {"revenue": revenue})

    result = step(DOORS, nurtured(), order, T0)

    assert result.effects[0] == ReachGoal(order.message_id, T0, None)


@pytest.mark.parametrize("revenue", ["NaN", "inf", "-Infinity", "1e400", float("nan")])
def test_goal_value_that_is_not_a_finite_number_is_no_value(revenue: Any) -> None:
    order = event("order_completed", properties={"revenue": revenue})

    result = step(DOORS, nurtured(), order, T0)

    assert result.effects[0] == ReachGoal(order.message_id, T0, None)


def test_goal_after_completion_still_counts() -> None:
    cooling = at_stage("cooling")
    lost = step(DOORS, cooling, timer_of(cooling, 1, at(days=30)), at(days=30)).enrollment
    assert lost is not None
    assert lost.state == "completed"

    order = event("order_completed", at(days=40), properties={"revenue": 900}, message_id="o9")
    assert step(DOORS, lost, order, at(days=40)) == Step(
        lost, (ReachGoal("o9", at(days=40), 900.0),)
    )


def test_goal_of_a_lead_never_enrolled_is_not_counted() -> None:
    order = event("order_completed", properties={"revenue": 900})
    assert step(DOORS, None, order, T0) == Step(None)


def test_goal_where_must_match() -> None:
    j = doors(
        goal={
            "on": "order_completed",
            "where": {"properties.status": "paid"},
            "value": "properties.revenue",
        }
    )
    enrollment = enter(j)

    unpaid = step(j, enrollment, event("order_completed", properties={"status": "pending"}), T0)

    assert of_type(unpaid.effects, ReachGoal) == []


def test_goal_on_the_entry_event_counts_for_the_new_enrollment() -> None:
    j = journey(
        [{"id": "customer"}],
        entry={"on": "order_completed"},
        goal={"on": "order_completed", "value": "properties.total"},
    )

    result = step(j, None, event("order_completed", properties={"total": 50}, message_id="o1"), T0)

    assert result.effects[-1] == ReachGoal("o1", T0, 50.0)


# --- late events ---------------------------------------------------------------------------------


def test_late_event_is_marked_late_in_the_cause() -> None:
    late = event("page", at(hours=1), context=FACEBOOK, late=True)

    result = step(DOORS, enter(), late, at(hours=3))

    line = only(result.effects, Transitioned)
    assert line.cause.late is True
    assert line.cause.timestamp == at(hours=1)
    assert line.at == at(hours=3)
    assert line.cause.as_dict()["late"] is True


# --- new versions of a map -----------------------------------------------------------------------

V2_STAGES = doors_stages(
    first_contact={
        "on_enter": [{"audience.add": "site_visitors"}, {"email.send": "welcome"}],
        "transitions": [
            {"on": "page", "where": {"context.campaign.source": "facebook"}, "to": "landing"},
            {"after": "3h", "to": "retargeting"},
        ],
    }
)


def test_upgrade_moves_lead_to_new_version_when_stage_exists_and_replans_timers() -> None:
    v2 = doors(version=2, stages=V2_STAGES)
    enrollment = enter()

    result = upgrade(v2, enrollment, at(hours=1))

    assert result.enrollment is not None
    assert (result.enrollment.version, result.enrollment.stage) == (2, "first_contact")
    assert result.enrollment.epoch == enrollment.epoch + 1
    assert result.enrollment.stage_entered_at == T0
    assert result.effects == (
        CancelTimers(),
        Transitioned(
            "first_contact",
            "first_contact",
            at(hours=1),
            Cause("version", detail="version 1 to 2"),
            since=T0,
        ),
        StartTimer("first_contact", 2, 1, at(hours=3)),  # 3h from the stage entry, not from now
    )


def test_upgrade_does_not_rerun_on_enter_actions() -> None:
    v2 = doors(version=2, stages=V2_STAGES)

    result = upgrade(v2, enter(), at(hours=1))

    assert of_type(result.effects, ChannelAction) == []
    assert of_type(result.effects, AddToAudience) == []


def test_upgrade_fires_an_overdue_timeout_at_once() -> None:
    v2 = doors(
        version=2,
        stages=doors_stages(first_contact={"transitions": [{"after": "1h", "to": "retargeting"}]}),
    )

    result = upgrade(v2, enter(), at(hours=1, minutes=30))

    assert only(result.effects, StartTimer).due_at == at(hours=1, minutes=30)


def test_upgrade_keeps_old_version_when_stage_is_gone() -> None:
    v2 = doors(
        version=2,
        stages=doors_stages(
            nurturing=None,
            landing={"transitions": [{"on": "catalog_requested", "to": "cooling"}]},
        ),
    )
    enrollment = nurtured()

    assert upgrade(v2, enrollment, at(days=1)) == Step(enrollment)


def test_upgrade_leaves_ended_and_current_enrollments_alone() -> None:
    v2 = doors(version=2, stages=V2_STAGES)
    exited = step(DOORS, enter(), event("email.unsubscribed"), T0).enrollment
    assert exited is not None
    on_v2 = enter(v2)

    assert upgrade(v2, exited, at(hours=1)) == Step(exited)
    assert upgrade(v2, on_v2, at(hours=1)) == Step(on_v2)


def test_upgrade_into_a_stage_that_became_terminal_completes_the_enrollment() -> None:
    v2 = doors(version=2, stages=doors_stages(cooling={"terminal": True}))
    cooling = replace(at_stage("cooling"), sequences=("door_tips",))

    result = upgrade(v2, cooling, at(days=1))

    assert result.enrollment is not None
    assert (result.enrollment.version, result.enrollment.state) == (2, "completed")
    assert (result.enrollment.ended_at, result.enrollment.sequences) == (at(days=1), ())
    assert of_type(result.effects, StartTimer) == []
    (stop,) = of_type(result.effects, ChannelAction)
    assert (stop.action, stop.target) == ("sequence.stop", "door_tips")


def test_step_is_pure() -> None:
    enrollment = enter()
    visit = event("page", at(hours=1), context=FACEBOOK)

    first = step(DOORS, enrollment, visit, at(hours=1))
    second = step(DOORS, enrollment, visit, at(hours=1))

    assert first == second
    assert enrollment == enter()


# --- sequences stopped by their stop_on events ------------------------------------------------


def test_stop_on_event_stops_the_running_sequence_and_still_moves_the_lead() -> None:
    lead = nurtured()
    assert lead.sequences == ("door_tips",)
    order = event("order_completed", at(days=1), properties={"revenue": 900})

    result = step(DOORS, lead, order, at(days=1))

    assert result.enrollment is not None
    assert result.enrollment.stage == "customer"
    assert result.enrollment.sequences == ()
    stops = [e for e in of_type(result.effects, ChannelAction) if e.action == "sequence.stop"]
    assert stops == [ChannelAction("sequence.stop", "door_tips", f"{lead.epoch}.stop.door_tips")]


def test_stop_on_event_stops_a_sequence_even_without_a_transition() -> None:
    j = journey(
        stages=[
            {"id": "first", "phase": "awareness", "on_enter": [{"sequence.start": "tips"}]},
        ],
        sequences={"tips": {"stop_on": ["replied"], "steps": [{"email": "tip"}]}},
    )
    lead = enter(j)

    result = step(j, lead, event("replied", at(hours=1)), at(hours=1))

    assert result.enrollment is not None
    assert result.enrollment.stage == "first" and result.enrollment.sequences == ()
    assert of_type(result.effects, ChannelAction) == [
        ChannelAction("sequence.stop", "tips", f"{lead.epoch}.stop.tips")
    ]
    again = step(j, result.enrollment, event("replied", at(hours=2)), at(hours=2))
    assert again.effects == ()


def test_stop_on_event_of_a_sequence_that_is_not_running_does_nothing() -> None:
    lead = at_stage("cooling")
    assert lead.sequences == ()

    result = step(DOORS, lead, event("order_completed", at(days=1)), at(days=1))

    assert [e for e in of_type(result.effects, ChannelAction) if e.action == "sequence.stop"] == []


def test_a_run_ending_in_a_terminal_stage_leaves_the_audiences_that_stage_does_not_add() -> None:
    ending = journey(
        [
            {
                "id": "browsing",
                "on_enter": [{"audience.add": ["visitors", "browsers"]}],
                "transitions": [{"on": "quit", "to": "lost"}],
            },
            {"id": "lost", "terminal": True, "on_enter": [{"audience.add": "win_back"}]},
        ],
        audiences={"visitors": {}, "browsers": {}, "win_back": {}},
    )
    browsing = step(ending, None, event("go"), at()).enrollment

    result = step(ending, browsing, event("quit", at(hours=1)), at(hours=1))

    assert result.enrollment is not None and result.enrollment.state == "completed"
    audience_effects = [
        effect
        for effect in result.effects
        if isinstance(effect, (AddToAudience, RemoveFromAudience))
    ]
    assert audience_effects == [
        AddToAudience("win_back"),
        RemoveFromAudience("visitors"),
        RemoveFromAudience("browsers"),
    ]
