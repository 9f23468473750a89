"""What a journey's map means for `step()`, worked out once per `Journey` object.

`step()` runs for every input of every lead. Most of what a move emits depends only
on the map: the effects of the new stage's `on_enter` actions, its timeouts, the
audiences a run ending there leaves, which events stop which sequences. A plan holds
those ready made, so that a move only fills in what belongs to the lead (the time,
the epoch, the keys). Effects are immutable values: one instance serves every lead.

A `Journey` is frozen and a new version of a map is a new object, so a plan never
goes stale: it is kept as long as its journey lives and dropped with it.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any

from engine.journey.conditions import MISSING, Condition
from engine.journey.model import (
    AfterTimeout,
    AudienceAdd,
    AudienceRemove,
    EmailSend,
    Goal,
    Journey,
    OfferGrant,
    SequenceStart,
    SequenceStop,
    Stage,
    TraitSet,
    Triggered,
    format_duration,
)
from engine.machine.values import (
    AddToAudience,
    ChannelAction,
    ChannelActionKind,
    Effect,
    Event,
    RemoveFromAudience,
    SetTrait,
)

# A stage's entry effects with channel actions are cached per epoch up to this one; a
# lead that has entered stages more often gets its keys made afresh (equal values).
CACHED_EPOCHS = 64


# --- where: tested on the event itself ----------------------------------------------------------

EventTest = Callable[[Event], bool]


def condition_of(triggered: Triggered) -> EventTest | None:
    """The `where` of `triggered` as a test of an event; None when there is none.

    `Condition` tests the event's view, a mapping made per event, and walks each path
    by splitting it on every call. Here the same clauses, with the very predicates the
    journey compiled (so a matcher means the same thing everywhere), read the event's
    fields directly along paths split once.
    """
    if not triggered.where:
        return None
    condition: Condition = triggered.condition
    tests = tuple((_path_reader(path), predicate) for path, predicate in condition.clauses)
    if len(tests) == 1:
        ((read, predicate),) = tests
        return lambda event: predicate(read(event))
    return lambda event: all(predicate(read(event)) for read, predicate in tests)


def _path_reader(path: str) -> Callable[[Event], Any]:
    """What `resolve_path(event.view, path)` finds, or MISSING, read off the event."""
    root, *parts = path.split(".")
    if root == "event":
        start: Callable[[Event], Any] = _event_name
    elif root in ("properties", "context", "traits"):
        start = _FIELD_READERS[root]
    else:
        return _missing  # the view has no other key
    if not parts:
        return start
    if len(parts) == 1:  # properties.path: the common case, without a loop
        (part,) = parts
        return lambda event: _get(start(event), part)

    def read(event: Event) -> Any:
        found = start(event)
        for part in parts:
            found = _get(found, part)
            if found is MISSING:
                break
        return found

    return read


def _get(container: Any, key: str) -> Any:
    # A dict is by far the most common mapping; checking it first spares the slower
    # isinstance against the abstract Mapping.
    if type(container) is dict or isinstance(container, Mapping):
        return container.get(key, MISSING)
    return MISSING


def _event_name(event: Event) -> Any:
    return event.name


def _missing(event: Event) -> Any:
    return MISSING


_FIELD_READERS: dict[str, Callable[[Event], Any]] = {
    "properties": lambda event: event.properties,
    "context": lambda event: event.context,
    "traits": lambda event: event.traits,
}


def _channel_action(action: object) -> tuple[ChannelActionKind, str] | None:
    """The outbox action and target of an `on_enter` action run by a channel."""
    if isinstance(action, EmailSend):
        return "email.send", action.template
    if isinstance(action, SequenceStart):
        return "sequence.start", action.sequence
    if isinstance(action, SequenceStop):
        return "sequence.stop", action.sequence
    if isinstance(action, OfferGrant):
        return "offer.grant", action.offer
    return None


class StagePlan:
    """One stage: where its events lead and what entering it emits."""

    __slots__ = (
        "_actions",
        "_by_epoch",
        "_static",
        "id",
        "leaving",
        "on_event",
        "sequence_changes",
        "terminal",
        "timeouts",
        "transitions",
    )

    def __init__(self, journey: Journey, stage: Stage) -> None:
        self.id = stage.id
        self.terminal = stage.terminal
        # Per event name, each transition on it in map order: its `where` and target.
        self.on_event: Mapping[str, tuple[tuple[EventTest | None, str], ...]] = {
            name: tuple((condition_of(transition), transition.to) for _, transition in found)
            for name, found in stage.on_event.items()
        }
        # Per transition index, what its timer does: the target and the timeout as
        # history states it; None for a transition on an event.
        self.transitions: tuple[tuple[str, str] | None, ...] = tuple(
            (transition.to, format_duration(transition.after))
            if isinstance(transition, AfterTimeout)
            else None
            for transition in stage.transitions
        )
        self.timeouts: tuple[tuple[int, timedelta], ...] = tuple(
            (index, timeout.after) for index, timeout in stage.timeouts
        )
        # The sequences entering starts (True) or stops (False), in the order they run.
        self.sequence_changes: tuple[tuple[bool, str], ...] = tuple(
            (isinstance(action, SequenceStart), action.sequence)
            for action in stage.on_enter
            if isinstance(action, SequenceStart | SequenceStop)
        )
        # A run that ends here leaves the journey's audiences, but for those this stage
        # adds the lead to (kept on purpose: a win-back audience) or removes it from.
        settled = {
            name
            for action in stage.on_enter
            if isinstance(action, AudienceAdd | AudienceRemove)
            for name in action.audiences
        }
        self.leaving: tuple[Effect, ...] = tuple(
            RemoveFromAudience(name) for name in journey.audiences if name not in settled
        )
        # The on_enter effects in order: ready values, or (action, target, index) for a
        # channel action, whose key carries the epoch of the entry.
        self._actions: list[Effect | tuple[ChannelActionKind, str, int]] = []
        for index, action in enumerate(stage.on_enter):
            if isinstance(action, AudienceAdd):
                self._actions.extend(AddToAudience(name) for name in action.audiences)
            elif isinstance(action, AudienceRemove):
                self._actions.extend(RemoveFromAudience(name) for name in action.audiences)
            elif isinstance(action, TraitSet):
                self._actions.extend(SetTrait(name, value) for name, value in action.traits.items())
            elif (channel := _channel_action(action)) is not None:
                self._actions.append((*channel, index))
        keyed = any(isinstance(action, tuple) for action in self._actions)
        self._static = None if keyed else self._made(0)  # the same at every epoch
        self._by_epoch: dict[int, tuple[Effect, ...]] = {}

    def entered(self, epoch: int) -> tuple[Effect, ...]:
        """The effects of the on_enter actions, in order, of an entry at `epoch`."""
        if self._static is not None:
            return self._static
        found = self._by_epoch.get(epoch)
        if found is None:
            found = self._made(epoch)
            if epoch < CACHED_EPOCHS:
                self._by_epoch[epoch] = found
        return found

    def _made(self, epoch: int) -> tuple[Effect, ...]:
        return tuple(
            ChannelAction(action[0], action[1], f"{epoch}.{action[2]}")
            if isinstance(action, tuple)
            else action
            for action in self._actions
        )


class JourneyPlan:
    """One journey: its stages' plans and what any event may do to an enrollment."""

    __slots__ = (
        "entry_condition",
        "entry_on",
        "exits",
        "first",
        "goal",
        "goal_condition",
        "goal_on",
        "journey_id",
        "leaving",
        "reentry_delay",
        "stages",
        "stoppers",
        "version",
    )

    def __init__(self, journey: Journey) -> None:
        self.journey_id = journey.id
        self.version = journey.version
        self.stages = {stage.id: StagePlan(journey, stage) for stage in journey.stages}
        first = journey.first_stage
        # Stage ids are unique in a loaded journey; were they not, entering still takes
        # the first stage listed, as `Journey.first_stage` does.
        same = journey.stage_by_id[first.id] is first
        self.first = self.stages[first.id] if same else StagePlan(journey, first)
        entry = journey.entry
        self.entry_on = entry.on
        self.entry_condition = condition_of(entry)
        self.reentry_delay = entry.reentry_delay
        # The goal when it has an event; its value is read by `Goal.value_of`.
        self.goal: Goal | None = journey.goal
        self.goal_on = None if journey.goal is None else journey.goal.on
        self.goal_condition = None if journey.goal is None else condition_of(journey.goal)
        # Per event name, the `where` of each exit rule on it, in map order.
        exits: dict[str, list[EventTest | None]] = {}
        for rule in journey.exit:
            exits.setdefault(rule.on, []).append(condition_of(rule))
        self.exits = {name: tuple(conditions) for name, conditions in exits.items()}
        # Per event name, the sequences it stops (`stop_on`).
        stoppers: dict[str, set[str]] = {}
        for name, sequence in journey.sequences.items():
            for event in sequence.stop_on:
                stoppers.setdefault(event, set()).add(name)
        self.stoppers = {event: frozenset(names) for event, names in stoppers.items()}
        # Leaving the journey (an exit rule) leaves every one of its audiences.
        self.leaving: tuple[Effect, ...] = tuple(
            RemoveFromAudience(name) for name in journey.audiences
        )


# Plans by the id of their journey. An entry goes when its journey is collected (a
# weakref callback runs before the id can be reused), so that processes loading
# journeys again and again (tests, map previews) keep no dead plans.
_plans: dict[int, JourneyPlan] = {}


def plan_of(journey: Journey) -> JourneyPlan:
    """The plan of `journey`, made on first use."""
    plan = _plans.get(id(journey))
    if plan is None:
        plan = _plans[id(journey)] = JourneyPlan(journey)
        weakref.finalize(journey, _plans.pop, id(journey), None)
    return plan
