"""`step()`: one input applied to one lead's enrollment in one journey.

Pure: the journey, the enrollment, the input and `now` in; the new enrollment and
the effects out. No clock, no database, no network, so the same function runs the
live engine, the simulator and the property tests.

This is the engine's inner loop, so what a move emits that depends only on the map is
read from the journey's plan (engine/machine/plan.py), made once per journey. Like
the values it makes, it is compiled to C by mypyc (setup.py).
"""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime

from engine.journey.model import Journey
from engine.machine.plan import JourneyPlan, StagePlan, plan_of
from engine.machine.values import (
    CancelTimers,
    Cause,
    ChannelAction,
    Effect,
    Enrollment,
    EnrollmentState,
    Event,
    Input,
    ReachGoal,
    StartTimer,
    Step,
    TimerFired,
    Transitioned,
)

_CANCEL_TIMERS = CancelTimers()  # no fields: one value serves every move


def step(journey: Journey, enrollment: Enrollment | None, input: Input, now: datetime) -> Step:
    """Apply `input` at `now` to the lead's latest enrollment in `journey` (None: never in it).

    An input causes at most one move per journey: entering, leaving, or one transition.
    """
    if isinstance(input, TimerFired):
        return _on_timer(plan_of(journey), enrollment, input, now)
    return _on_event(plan_of(journey), enrollment, input, now)


def upgrade(journey: Journey, enrollment: Enrollment, now: datetime) -> Step:
    """Move an active enrollment onto `journey`, a newer version of its map.

    Only possible while its stage still exists; its timeouts are planned again from
    the stage entry by the new map's durations (one already overdue fires at `now`).
    A stage that became terminal ends the run there, as entering it would have.
    """
    stage = plan_of(journey).stages.get(enrollment.stage)
    if not enrollment.active or stage is None or enrollment.version == journey.version:
        return Step(enrollment)
    moved = replace(enrollment, version=journey.version, epoch=enrollment.epoch + 1)
    cause = Cause("version", detail=f"version {enrollment.version} to {journey.version}")
    since = moved.stage_entered_at
    effects: list[Effect] = [
        _CANCEL_TIMERS,
        Transitioned(stage.id, stage.id, now, cause, since),
    ]
    _start_timers(stage, moved.epoch, since, now, effects)
    if stage.terminal:
        _end_here(stage, moved.epoch, moved.sequences, effects)
        moved = replace(moved, state="completed", ended_at=now, sequences=())
    return Step(moved, tuple(effects))


def leave(enrollment: Enrollment, now: datetime, cause: Cause) -> Step:
    """End an active enrollment at once: timers void, sequences stopped."""
    effects: list[Effect] = [
        _CANCEL_TIMERS,
        Transitioned(enrollment.stage, None, now, cause, enrollment.stage_entered_at),
    ]
    _stop_sequences(enrollment.sequences, enrollment.epoch, "exit", effects)
    ended = Enrollment(
        enrollment.journey_id,
        enrollment.version,
        enrollment.entry_no,
        enrollment.stage,
        "exited",
        enrollment.epoch,
        enrollment.entered_at,
        enrollment.stage_entered_at,
        now,
        (),
    )
    return Step(ended, tuple(effects))


# --- inputs --------------------------------------------------------------------------------------


def _on_event(
    plan: JourneyPlan, enrollment: Enrollment | None, event: Event, now: datetime
) -> Step:
    name = event.name
    effects: list[Effect] = []
    if enrollment is None or enrollment.state != "active":
        if name == plan.entry_on and (
            (condition := plan.entry_condition) is None or condition(event)
        ):
            delay = plan.reentry_delay
            if enrollment is None or (delay is not None and now >= enrollment.entered_at + delay):
                enrollment = _arrive(
                    plan.first,
                    journey_id=plan.journey_id,
                    version=plan.version,
                    entry_no=1 if enrollment is None else enrollment.entry_no + 1,
                    state="active",
                    epoch=1,
                    entered_at=now,
                    ended_at=None,
                    from_stage=None,
                    sequences=(),
                    since=None,
                    now=now,
                    cause=Cause(
                        "entry", name, event.message_id, event.timestamp, event.late, None, None
                    ),
                    effects=effects,
                )
        if enrollment is not None and name == plan.goal_on:
            _reach_goal(plan, event, effects)
        return Step(enrollment, tuple(effects))

    if name == plan.goal_on:
        _reach_goal(plan, event, effects)
    exits = plan.exits.get(name)
    if exits is not None:
        for condition in exits:
            if condition is None or condition(event):
                cause = Cause(
                    "exit", name, event.message_id, event.timestamp, event.late, None, None
                )
                left = leave(enrollment, now, cause)
                return Step(left.enrollment, (*effects, *left.effects, *plan.leaving))
    sequences = enrollment.sequences
    if sequences and (stopped := plan.stoppers.get(name)) is not None:
        sequences = _stop_on(enrollment, sequences, stopped, effects)
    for condition, to in plan.stages[enrollment.stage].on_event.get(name, ()):
        if condition is None or condition(event):
            cause = Cause("event", name, event.message_id, event.timestamp, event.late, None, None)
            return _move(plan, enrollment, sequences, to, now, cause, effects)
    if sequences is not enrollment.sequences:
        enrollment = replace(enrollment, sequences=sequences)
    return Step(enrollment, tuple(effects))


def _on_timer(
    plan: JourneyPlan, enrollment: Enrollment | None, timer: TimerFired, now: datetime
) -> Step:
    if (
        enrollment is None
        or enrollment.state != "active"
        or timer.entry_no != enrollment.entry_no
        or timer.epoch != enrollment.epoch
        or timer.stage != enrollment.stage
    ):
        return Step(enrollment, ())  # the lead left that stage: the timer is void
    timeout = plan.stages[enrollment.stage].transitions[timer.transition]
    if timeout is None:
        return Step(enrollment, ())  # not a timeout of the stage
    to, after = timeout
    cause = Cause("timer", None, None, timer.due_at, False, after, None)
    return _move(plan, enrollment, enrollment.sequences, to, now, cause, [])


# --- moves ---------------------------------------------------------------------------------------


def _move(
    plan: JourneyPlan,
    enrollment: Enrollment,
    sequences: tuple[str, ...],
    to: str,
    now: datetime,
    cause: Cause,
    effects: list[Effect],
) -> Step:
    effects.append(_CANCEL_TIMERS)
    moved = _arrive(
        plan.stages[to],
        journey_id=enrollment.journey_id,
        version=enrollment.version,
        entry_no=enrollment.entry_no,
        state=enrollment.state,
        epoch=enrollment.epoch + 1,
        entered_at=enrollment.entered_at,
        ended_at=enrollment.ended_at,
        from_stage=enrollment.stage,
        sequences=sequences,
        since=enrollment.stage_entered_at,
        now=now,
        cause=cause,
        effects=effects,
    )
    return Step(moved, tuple(effects))


def _arrive(
    stage: StagePlan,
    *,
    journey_id: str,
    version: int,
    entry_no: int,
    state: EnrollmentState,
    epoch: int,
    entered_at: datetime,
    ended_at: datetime | None,
    from_stage: str | None,
    sequences: tuple[str, ...],
    since: datetime | None,
    now: datetime,
    cause: Cause,
    effects: list[Effect],
) -> Enrollment:
    """Enter `stage` at `now`: the history line, its on_enter actions and its timeouts
    go to `effects`; a terminal stage ends the run there. The enrollment as it is then."""
    effects.append(Transitioned(from_stage, stage.id, now, cause, since))
    effects.extend(stage.entered(epoch))
    if stage.timeouts:
        _start_timers(stage, epoch, now, now, effects)
    if stage.sequence_changes:
        sequences = _changed_sequences(sequences, stage.sequence_changes)
    if stage.terminal:
        _end_here(stage, epoch, sequences, effects)
        state, ended_at, sequences = "completed", now, ()
    return Enrollment(
        journey_id,
        version,
        entry_no,
        stage.id,
        state,
        epoch,
        entered_at,
        now,
        ended_at,
        sequences,
    )


def _start_timers(
    stage: StagePlan, epoch: int, since: datetime, not_before: datetime, effects: list[Effect]
) -> None:
    for index, after in stage.timeouts:
        due = since + after
        effects.append(StartTimer(stage.id, epoch, index, not_before if not_before > due else due))


def _changed_sequences(
    sequences: tuple[str, ...], changes: tuple[tuple[bool, str], ...]
) -> tuple[str, ...]:
    """The running sequences after entering a stage that starts or stops some."""
    running = list(sequences)
    for start, name in changes:
        if start:
            if name not in running:
                running.append(name)
        elif name in running:
            running.remove(name)
    return tuple(running)


def _end_here(
    stage: StagePlan, epoch: int, sequences: tuple[str, ...], effects: list[Effect]
) -> None:
    """A terminal stage ends the run: its sequences stop and the lead leaves the
    journey's audiences but those the stage settles itself (see `StagePlan.leaving`)."""
    _stop_sequences(sequences, epoch, "end", effects)
    effects.extend(stage.leaving)


def _stop_on(
    enrollment: Enrollment,
    sequences: tuple[str, ...],
    stopped: frozenset[str],
    effects: list[Effect],
) -> tuple[str, ...]:
    """Stop each running sequence that lists the event in `stop_on` (a purchase ends the
    nurture emails); the event may still move the lead as well. The sequences left."""
    stopping = [name for name in sequences if name in stopped]
    if not stopping:
        return sequences
    epoch = enrollment.epoch
    effects.extend(
        ChannelAction("sequence.stop", name, f"{epoch}.stop.{name}") for name in stopping
    )
    return tuple(name for name in sequences if name not in stopped)


def _stop_sequences(
    sequences: tuple[str, ...], epoch: int, why: str, effects: list[Effect]
) -> None:
    effects.extend(
        ChannelAction("sequence.stop", name, f"{epoch}.{why}.{name}") for name in sequences
    )


def _reach_goal(plan: JourneyPlan, event: Event, effects: list[Effect]) -> None:
    """A goal event (its name checked by the caller): a deal, when its `where` holds."""
    goal = plan.goal
    assert goal is not None  # only a journey with a goal has a goal event
    condition = plan.goal_condition
    if condition is None or condition(event):
        value = goal.value_of(event.view)
        effects.append(ReachGoal(event.message_id, event.timestamp, value))
