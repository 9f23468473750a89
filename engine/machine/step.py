"""`step()`: one input applied to one lead's enrollment in one journey.

Pure: the journey, the enrollment, the input and `now` in; the new enrollment and
the effects out. No clock, no database, no network, so the same function runs the
live engine, the simulator and the property tests.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Literal

from engine.journey.model import (
    AfterTimeout,
    AudienceAdd,
    AudienceRemove,
    EmailSend,
    Journey,
    OfferGrant,
    SequenceStart,
    SequenceStop,
    Stage,
    TraitSet,
    format_duration,
)
from engine.machine.values import (
    AddToAudience,
    CancelTimers,
    Cause,
    ChannelAction,
    Effect,
    Enrollment,
    Event,
    Input,
    ReachGoal,
    RemoveFromAudience,
    SetTrait,
    StartTimer,
    Step,
    TimerFired,
    Transitioned,
)


def step(journey: Journey, enrollment: Enrollment | None, input: Input, now: datetime) -> Step:
    """Apply `input` at `now` to the lead's latest enrollment in `journey` (None: never in it).

    An input causes at most one move per journey: entering, leaving, or one transition.
    """
    if isinstance(input, TimerFired):
        return _on_timer(journey, enrollment, input, now)
    return _on_event(journey, enrollment, input, now)


def upgrade(journey: Journey, enrollment: Enrollment, now: datetime) -> Step:
    """Move an active enrollment onto `journey`, a newer version of its map.

    Only possible while its stage still exists; its timeouts are planned again from
    the stage entry by the new map's durations (one already overdue fires at `now`).
    A stage that became terminal ends the run there, as entering it would have.
    """
    stage = journey.stage_by_id.get(enrollment.stage)
    if not enrollment.active or stage is None or enrollment.version == journey.version:
        return Step(enrollment)
    moved = replace(enrollment, version=journey.version, epoch=enrollment.epoch + 1)
    cause = Cause("version", detail=f"version {enrollment.version} to {journey.version}")
    effects: list[Effect] = [
        CancelTimers(),
        Transitioned(stage.id, stage.id, now, cause, since=moved.stage_entered_at),
        *_start_timers(stage, moved, since=moved.stage_entered_at, not_before=now),
    ]
    return Step(_finish_if_terminal(journey, moved, now, effects), tuple(effects))


def leave(enrollment: Enrollment, now: datetime, cause: Cause) -> Step:
    """End an active enrollment at once: timers void, sequences stopped."""
    effects: list[Effect] = [
        CancelTimers(),
        Transitioned(enrollment.stage, None, now, cause, since=enrollment.stage_entered_at),
    ]
    effects.extend(_stop_sequences(enrollment, "exit"))
    ended = replace(enrollment, state="exited", ended_at=now, sequences=())
    return Step(ended, tuple(effects))


# --- inputs --------------------------------------------------------------------------------------


def _on_event(journey: Journey, enrollment: Enrollment | None, event: Event, now: datetime) -> Step:
    view = event.view
    effects: list[Effect] = []
    if enrollment is None or not enrollment.active:
        if _may_enter(journey, enrollment, event, view, now):
            entry_no = 1 if enrollment is None else enrollment.entry_no + 1
            enrollment = _new_enrollment(journey, entry_no, now)
            cause = _event_cause("entry", event)
            effects.extend(_enter_stage(journey, journey.first_stage, enrollment, None, now, cause))
            enrollment = _finish_if_terminal(journey, enrollment, now, effects)
        if enrollment is not None:
            effects.extend(_goal(journey, event, view))
        return Step(enrollment, tuple(effects))

    effects.extend(_goal(journey, event, view))
    for rule in journey.exit:
        if rule.on == event.name and rule.condition(view):
            left = leave(enrollment, now, _event_cause("exit", event))
            return Step(left.enrollment, (*effects, *left.effects, *_leave_audiences(journey)))
    enrollment = _stop_on(journey, enrollment, event, effects)
    stage = journey.stage(enrollment.stage)
    for _, transition in stage.on_event.get(event.name, ()):
        if transition.condition(view):
            cause = _event_cause("event", event)
            return _move(journey, enrollment, transition.to, now, cause, effects)
    return Step(enrollment, tuple(effects))


def _on_timer(
    journey: Journey, enrollment: Enrollment | None, timer: TimerFired, now: datetime
) -> Step:
    if (
        enrollment is None
        or not enrollment.active
        or timer.entry_no != enrollment.entry_no
        or timer.epoch != enrollment.epoch
        or timer.stage != enrollment.stage
    ):
        return Step(enrollment)  # the lead left that stage: the timer is void
    transition = journey.stage(enrollment.stage).transitions[timer.transition]
    if not isinstance(transition, AfterTimeout):
        return Step(enrollment)
    cause = Cause("timer", timestamp=timer.due_at, after=format_duration(transition.after))
    return _move(journey, enrollment, transition.to, now, cause, [])


# --- moves ---------------------------------------------------------------------------------------


def _may_enter(
    journey: Journey,
    previous: Enrollment | None,
    event: Event,
    view: Mapping[str, Any],
    now: datetime,
) -> bool:
    entry = journey.entry
    if entry.on != event.name or not entry.condition(view):
        return False
    if previous is None:
        return True
    delay = entry.reentry_delay
    return delay is not None and now >= previous.entered_at + delay


def _new_enrollment(journey: Journey, entry_no: int, now: datetime) -> Enrollment:
    return Enrollment(
        journey_id=journey.id,
        version=journey.version,
        entry_no=entry_no,
        stage=journey.first_stage.id,
        state="active",
        epoch=1,
        entered_at=now,
        stage_entered_at=now,
    )


def _move(
    journey: Journey,
    enrollment: Enrollment,
    to: str,
    now: datetime,
    cause: Cause,
    effects: list[Effect],
) -> Step:
    effects.append(CancelTimers())
    # Spelled out rather than dataclasses.replace, which costs several times more on
    # the engine's hottest path.
    moved = Enrollment(
        journey_id=enrollment.journey_id,
        version=enrollment.version,
        entry_no=enrollment.entry_no,
        stage=to,
        state=enrollment.state,
        epoch=enrollment.epoch + 1,
        entered_at=enrollment.entered_at,
        stage_entered_at=now,
        ended_at=enrollment.ended_at,
        sequences=enrollment.sequences,
    )
    stage = journey.stage(to)
    effects.extend(
        _enter_stage(
            journey, stage, moved, enrollment.stage, now, cause, since=enrollment.stage_entered_at
        )
    )
    return Step(_finish_if_terminal(journey, moved, now, effects), tuple(effects))


def _enter_stage(
    journey: Journey,
    stage: Stage,
    enrollment: Enrollment,
    from_stage: str | None,
    now: datetime,
    cause: Cause,
    since: datetime | None = None,
) -> list[Effect]:
    effects: list[Effect] = [Transitioned(from_stage, stage.id, now, cause, since)]
    for index, action in enumerate(stage.on_enter):
        key = f"{enrollment.epoch}.{index}"
        if isinstance(action, AudienceAdd):
            effects.extend(AddToAudience(name) for name in action.audiences)
        elif isinstance(action, AudienceRemove):
            effects.extend(RemoveFromAudience(name) for name in action.audiences)
        elif isinstance(action, TraitSet):
            effects.extend(SetTrait(name, value) for name, value in action.traits.items())
        elif isinstance(action, EmailSend):
            effects.append(ChannelAction("email.send", action.template, key))
        elif isinstance(action, SequenceStart):
            effects.append(ChannelAction("sequence.start", action.sequence, key))
        elif isinstance(action, SequenceStop):
            effects.append(ChannelAction("sequence.stop", action.sequence, key))
        elif isinstance(action, OfferGrant):
            effects.append(ChannelAction("offer.grant", action.offer, key))
    effects.extend(_start_timers(stage, enrollment, since=now, not_before=now))
    return effects


def _start_timers(
    stage: Stage, enrollment: Enrollment, *, since: datetime, not_before: datetime
) -> list[Effect]:
    return [
        StartTimer(stage.id, enrollment.epoch, index, max(since + timeout.after, not_before))
        for index, timeout in stage.timeouts
    ]


def _with_sequences(enrollment: Enrollment, effects: list[Effect]) -> Enrollment:
    """The enrollment's running sequences after the channel actions among `effects`."""
    running = list(enrollment.sequences)
    for effect in effects:
        if isinstance(effect, ChannelAction):
            if effect.action == "sequence.start" and effect.target not in running:
                running.append(effect.target)
            elif effect.action == "sequence.stop" and effect.target in running:
                running.remove(effect.target)
    if tuple(running) == enrollment.sequences:
        return enrollment  # most steps start or stop none: no copy
    return replace(enrollment, sequences=tuple(running))


def _finish_if_terminal(
    journey: Journey, enrollment: Enrollment, now: datetime, effects: list[Effect]
) -> Enrollment:
    """A terminal stage ends the run: the lead leaves the journey there."""
    enrollment = _with_sequences(enrollment, effects)
    if not journey.stage(enrollment.stage).terminal:
        return enrollment
    effects.extend(_stop_sequences(enrollment, "end"))
    effects.extend(_leave_audiences(journey, keep=journey.stage(enrollment.stage)))
    return replace(enrollment, state="completed", ended_at=now, sequences=())


def _leave_audiences(journey: Journey, keep: Stage | None = None) -> list[Effect]:
    """A lead whose run ends leaves the journey's audiences: ads follow the journey. The
    audiences the final stage itself adds the lead to are kept (a terminal `lost` stage
    may put the lead in a win-back audience on purpose)."""
    # Audiences the final stage adds are kept; those it removes are gone already.
    settled = {
        name
        for action in (keep.on_enter if keep is not None else ())
        if isinstance(action, AudienceAdd | AudienceRemove)
        for name in action.audiences
    }
    return [RemoveFromAudience(name) for name in journey.audiences if name not in settled]


def _stop_on(
    journey: Journey, enrollment: Enrollment, event: Event, effects: list[Effect]
) -> Enrollment:
    """Stop each running sequence that lists the event in `stop_on` (a purchase ends the
    nurture emails); the event may still move the lead as well."""
    stopping = [
        name
        for name in enrollment.sequences
        if name in journey.sequences and event.name in journey.sequences[name].stop_on
    ]
    if not stopping:
        return enrollment
    effects.extend(
        ChannelAction("sequence.stop", name, f"{enrollment.epoch}.stop.{name}") for name in stopping
    )
    running = tuple(name for name in enrollment.sequences if name not in stopping)
    return replace(enrollment, sequences=running)


def _stop_sequences(enrollment: Enrollment, why: str) -> list[Effect]:
    return [
        ChannelAction("sequence.stop", name, f"{enrollment.epoch}.{why}.{name}")
        for name in enrollment.sequences
    ]


def _goal(journey: Journey, event: Event, view: Mapping[str, Any]) -> list[Effect]:
    goal = journey.goal
    if goal is None or goal.on != event.name or not goal.condition(view):
        return []
    return [ReachGoal(event.message_id, event.timestamp, goal.value_of(view))]


def _event_cause(kind: Literal["entry", "event", "exit"], event: Event) -> Cause:
    return Cause(
        kind,
        event=event.name,
        message_id=event.message_id,
        timestamp=event.timestamp,
        late=event.late,
    )
