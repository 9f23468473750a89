"""The parts of the core's inner loop made once: journey plans and the `where` clauses
read off the event."""

from __future__ import annotations

import gc
from datetime import timedelta
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.journey.model import OnEvent
from engine.machine import plan
from engine.machine.plan import CACHED_EPOCHS, condition_of, plan_of
from engine.machine.step import step
from engine.machine.values import (
    AddToAudience,
    ChannelAction,
    Event,
    RemoveFromAudience,
    StartTimer,
)

from .support import CATALOG, T0, doors, doors_stages, event, journey

DOORS = doors()

# --- plans ---------------------------------------------------------------------------------------


def test_a_new_version_of_a_journey_gets_a_plan_of_its_own() -> None:
    v1 = doors()
    v2 = doors(
        version=2,
        stages=doors_stages(
            first_contact={
                "on_enter": [{"email.send": "welcome"}],
                "transitions": [{"after": "3h", "to": "retargeting"}],
            }
        ),
    )

    first = step(v1, None, event("page", properties=CATALOG), T0)
    second = step(v2, None, event("page", properties=CATALOG), T0)

    assert plan_of(v1) is plan_of(v1)
    assert plan_of(v2) is not plan_of(v1)
    first_due = [e.due_at for e in first.effects if isinstance(e, StartTimer)]
    second_due = [e.due_at for e in second.effects if isinstance(e, StartTimer)]
    assert first_due == [T0 + timedelta(hours=2)]
    assert second_due == [T0 + timedelta(hours=3)]
    assert [e for e in second.effects if isinstance(e, ChannelAction)] == [
        ChannelAction("email.send", "welcome", "1.0")
    ]
    assert second.enrollment is not None and second.enrollment.version == 2


def test_the_plan_of_a_journey_goes_with_the_journey() -> None:
    passing = doors(name="Loaded for a preview")
    key = id(passing)
    plan_of(passing)
    assert key in plan._plans

    del passing
    gc.collect()

    assert key not in plan._plans


def test_entry_effects_are_the_same_past_the_cached_epochs() -> None:
    nurturing = plan_of(DOORS).stages["nurturing"]

    for epoch in (1, 2, CACHED_EPOCHS - 1, CACHED_EPOCHS, CACHED_EPOCHS + 7):
        assert nurturing.entered(epoch) == (
            ChannelAction("sequence.start", "door_tips", f"{epoch}.0"),
            ChannelAction("offer.grant", "free_install", f"{epoch}.1"),
        )
    assert nurturing.entered(3) is nurturing.entered(3)  # cached, not made again
    assert CACHED_EPOCHS + 7 not in nurturing._by_epoch


# --- where, read off the event -------------------------------------------------------------------

PATHS = (
    "event",
    "properties.v",
    "properties.a.b",
    "context.campaign.source",
    "traits.tier",
    "traits.tags",
)
OPERANDS: dict[str, st.SearchStrategy[Any]] = {
    "eq": st.sampled_from([1, 2, "2", True, None, "gold", "page"]),
    "ne": st.sampled_from([1, "gold", None, False]),
    "in": st.lists(st.sampled_from([1, 2, "gold", True, None]), max_size=3),
    "not_in": st.lists(st.sampled_from([1, "basic", None]), max_size=3),
    "gt": st.sampled_from([0, 1.5, "a"]),
    "gte": st.sampled_from([1, "b"]),
    "lt": st.sampled_from([2, "m"]),
    "lte": st.sampled_from([1, 2.0]),
    "startswith": st.sampled_from(["/cat", "go", ""]),
    "endswith": st.sampled_from(["ld", "x"]),
    "contains": st.sampled_from(["ol", 1, "vip"]),
    "exists": st.booleans(),
}
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-1, 3),
    st.sampled_from([1.5, 2.0, "2", "gold", "basic", "/catalog/oak", "page", "b"]),
    st.lists(st.sampled_from(["vip", 1, True]), max_size=2),
)
MAPPINGS: st.SearchStrategy[Any] = st.recursive(
    st.dictionaries(st.sampled_from(["v", "a", "b", "tier", "tags", "campaign", "source"]), VALUES),
    lambda inner: st.dictionaries(
        st.sampled_from(["a", "b", "campaign", "source", "v"]), st.one_of(VALUES, inner)
    ),
    max_leaves=6,
)


@st.composite
def wheres(draw: st.DrawFn) -> dict[str, Any]:
    where: dict[str, Any] = {}
    for path in draw(st.lists(st.sampled_from(PATHS), min_size=1, max_size=3, unique=True)):
        if draw(st.booleans()):
            where[path] = draw(OPERANDS["eq"])
        else:
            operator = draw(st.sampled_from(sorted(OPERANDS)))
            where[path] = {operator: draw(OPERANDS[operator])}
    return where


@st.composite
def events(draw: st.DrawFn) -> Event:
    return event(
        draw(st.sampled_from(["page", "b"])),
        properties=draw(st.one_of(MAPPINGS, st.just({"a": "not a mapping"}))),
        context=draw(MAPPINGS),
        traits=draw(MAPPINGS),
    )


@settings(max_examples=400, deadline=None)
@given(wheres(), st.lists(events(), min_size=1, max_size=5))
def test_where_read_off_the_event_agrees_with_the_journeys_condition(
    where: dict[str, Any], tested: list[Event]
) -> None:
    transition = OnEvent.model_validate({"on": "page", "where": where, "to": "s"})
    test = condition_of(transition)

    assert test is not None
    for one in tested:
        assert test(one) == transition.condition(one.view)


def test_a_transition_without_where_has_no_test_to_run() -> None:
    assert condition_of(OnEvent.model_validate({"on": "page", "to": "s"})) is None
    assert condition_of(OnEvent.model_validate({"on": "page", "where": {}, "to": "s"})) is None


def test_where_on_a_mapping_that_is_not_a_dict() -> None:
    class Props(dict[str, Any]):
        pass

    j = journey([{"id": "s", "transitions": []}], entry={"on": "go", "where": {"properties.v": 2}})
    test = condition_of(j.entry)
    assert test is not None
    assert test(event("go", properties=Props(v=2)))
    assert not test(event("go", properties=Props(v=3)))


# --- effects and stages ------------------------------------------------------------------------


def test_effect_values_of_different_kinds_never_compare_equal() -> None:
    assert AddToAudience("fans") != RemoveFromAudience("fans")
    assert plan_of(DOORS).leaving  # shared instances are still plain values
    assert all(isinstance(effect, RemoveFromAudience) for effect in plan_of(DOORS).leaving)


def test_a_journey_with_a_repeated_stage_id_is_entered_at_its_first_stage() -> None:
    j = journey(
        [
            {"id": "s", "on_enter": [{"email.send": "first"}], "transitions": []},
            {"id": "s", "on_enter": [{"email.send": "second"}], "transitions": []},
        ]
    )

    entered = step(j, None, event("go"), T0)

    assert [e.target for e in entered.effects if isinstance(e, ChannelAction)] == ["first"]
