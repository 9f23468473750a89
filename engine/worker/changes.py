"""The rows one batch of work writes, gathered in memory and written in bulk.

A batch of leads ends in one transaction: new and changed enrollments, history,
timers, channel actions for the outbox, audience memberships, goals, lead traits.
Either all of it is committed with the events marked processed, or none of it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

import orjson

from engine.db import queries
from engine.db.database import SqlConnection
from engine.db.types import from_micros
from engine.kpis.rollup import record_batch
from engine.kpis.sources import FirstTouch
from engine.machine.lead import JourneyEffect, Lead, Outcome, PendingTimer
from engine.machine.values import (
    AddToAudience,
    Cause,
    ChannelAction,
    Enrollment,
    EnrollmentState,
    ReachGoal,
    RemoveFromAudience,
    Transitioned,
)

EnrollmentKey = tuple[int, str, int]  # lead id, journey id, entry number


def enrollment_from_row(row: queries.EnrollmentRow) -> Enrollment:
    return Enrollment(
        row.journey_id,
        row.version,
        row.entry_no,
        row.stage,
        cast(EnrollmentState, row.state),
        row.epoch,
        from_micros(row.entered_at),
        from_micros(row.stage_entered_at),
        queries.instant(row.ended_at),
        tuple(row.sequences),
    )


# The traits the ad platforms match a lead on (channels/audiences/normalize.py).
IDENTITY_TRAITS = ("email", "phone", "first_name", "last_name", "city", "state", "zip", "country")


def _identity_moved(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    return any(before.get(name) != after.get(name) for name in IDENTITY_TRAITS)


def cause_json(cause: Cause) -> str:
    """`cause.as_dict()` as JSON text, written in one call: the same text, at a third
    of the cost (orjson writes the timestamp itself, "Z" for UTC as `as_dict` does)."""
    found: dict[str, Any] = {"type": cause.kind}
    if cause.event is not None:
        found["event"] = cause.event
    if cause.message_id is not None:
        found["message_id"] = cause.message_id
    if cause.timestamp is not None:
        found["timestamp"] = cause.timestamp
    if cause.late:
        found["late"] = True
    if cause.after is not None:
        found["after"] = cause.after
    if cause.detail is not None:
        found["detail"] = cause.detail
    return orjson.dumps(found, option=orjson.OPT_UTC_Z).decode()


def _email_of(traits: dict[str, Any]) -> str | None:
    email = traits.get("email")
    return email.strip().lower()[:320] if isinstance(email, str) and email.strip() else None


class Changes:
    """Everything a batch will write; `write()` sends it in a few bulk statements."""

    def __init__(
        self, enrollment_ids: dict[EnrollmentKey, int], now: datetime, *, kpis: bool = True
    ) -> None:
        self.enrollment_ids = enrollment_ids  # known rows; filled in for new ones on write
        self.now = now
        # Whether to add the batch to the KPI roll-ups; a merge rewrites them itself.
        self.kpis = kpis
        self.sources: dict[int, str] = {}  # each lead's first-touch source after the batch
        self.sources_moved: set[int] = set()  # leads whose first touch this batch changed
        self.advanced = 0  # leads taken forward
        self.leads: list[queries.LeadUpdate] = []  # leads changed: their rows rewritten
        self.clocks: list[queries.LeadClock] = []  # leads whose clock alone moved
        self.identities_moved: list[int] = []  # leads whose IDENTITY_TRAITS this batch changed
        self.enrollments: dict[EnrollmentKey, Enrollment] = {}
        self.effects: list[tuple[int, JourneyEffect]] = []
        self.timers: list[tuple[int, PendingTimer]] = []
        self.fired: list[int] = []
        self.cancelled: set[EnrollmentKey] = set()
        self.processed: list[int] = []
        # What `write()` wrote, for the metrics once committed: moves per journey, and how
        # late each timeout's move was (dated when it fell due, whether its timer was
        # stored or fell due within the batch's own events).
        self.moves: Counter[str] = Counter()
        self.timer_lags: list[float] = []

    def add_outcome(
        self,
        lead_id: int,
        outcome: Outcome,
        event_ids: Sequence[int],
        first_touch: FirstTouch,
        first_touch_moved: bool,
        before: Lead,
    ) -> None:
        self.advanced += 1
        # The core hands back a new dict of traits whether or not they changed: compared
        # whole first (in C), since a timeout's move changes none and the look at each
        # identity trait cost 1 µs a lead.
        traits_after = outcome.lead.traits
        traits_moved = traits_after != before.traits
        if traits_moved and _identity_moved(before.traits, traits_after):
            self.identities_moved.append(lead_id)
        # The lead's row whole only when the lead changed. Most batches only move its
        # clock (the watermark, and `updated_at` when events were applied; a timeout's
        # move alone leaves `updated_at`, since it changes the run, not the lead): two
        # columns and no index touched cost SQLite a third of rewriting the row and its
        # email's index, and spare serializing the traits.
        if traits_moved or first_touch_moved:
            traits = dict(traits_after)
            self.leads.append(
                (
                    lead_id,
                    traits,
                    _email_of(traits),
                    outcome.lead.watermark,
                    first_touch.source,
                    first_touch.at,
                    self.now,
                )
            )
        elif event_ids or outcome.lead.watermark != before.watermark:
            self.clocks.append((lead_id, outcome.lead.watermark, self.now if event_ids else None))
        self.sources[lead_id] = first_touch.source or ""
        if first_touch_moved:
            self.sources_moved.add(lead_id)
        self.add_effects(lead_id, outcome.changed, outcome.effects)
        self.timers.extend((lead_id, timer) for timer in outcome.timers)
        self.fired.extend(outcome.fired)
        self.cancelled.update((lead_id, journey, entry) for journey, entry in outcome.cancelled)
        self.processed.extend(event_ids)

    def add_effects(
        self,
        lead_id: int,
        changed: Sequence[Enrollment],
        effects: Sequence[JourneyEffect],
    ) -> None:
        for enrollment in changed:
            self.enrollments[(lead_id, enrollment.journey_id, enrollment.entry_no)] = enrollment
        self.effects.extend((lead_id, effect) for effect in effects)

    async def write(self, connection: SqlConnection) -> None:
        """Everything, in a few bulk statements. Plain SQL only (`SqlConnection`): the
        worker runs it in one trip to SQLite's thread (`Database.within_write`)."""
        await self._write_enrollments(connection)
        ids = self.enrollment_ids
        transitions: list[queries.NewTransition] = []
        outbox: list[queries.NewChannelAction] = []
        goals: list[queries.NewGoal] = []
        # The last audience change per (audience, lead) wins; an add and remove in one
        # batch still leaves both times on the membership.
        added: dict[tuple[str, int], queries.AudienceAdd] = {}
        removed: dict[tuple[str, int], queries.AudienceRemoval] = {}
        counted: list[tuple[int, JourneyEffect]] = []  # what the KPI roll-ups count
        for lead_id, item in self.effects:
            enrollment_id = ids[(lead_id, item.journey_id, item.entry_no)]
            effect = item.effect
            if isinstance(effect, Transitioned):
                self.moves[item.journey_id] += 1
                if effect.from_stage != effect.to_stage:
                    counted.append((lead_id, item))
                if effect.cause.kind == "timer":
                    self.timer_lags.append((self.now - effect.at).total_seconds())
                transitions.append(
                    (
                        enrollment_id,
                        item.journey_id,
                        effect.from_stage,
                        effect.to_stage,
                        effect.at,
                        cause_json(effect.cause),
                    )
                )
            elif isinstance(effect, ChannelAction):
                outbox.append(
                    (
                        f"{enrollment_id}/{effect.key}",
                        lead_id,
                        enrollment_id,
                        item.journey_id,
                        effect.action,
                        effect.target,
                        item.at,
                    )
                )
            elif isinstance(effect, ReachGoal):
                counted.append((lead_id, item))
                goals.append(
                    (enrollment_id, item.journey_id, effect.message_id, effect.at, effect.value)
                )
            elif isinstance(effect, AddToAudience):
                key = (effect.audience, lead_id)
                removed.pop(key, None)
                added[key] = (effect.audience, lead_id, item.journey_id, item.at, None)
            elif isinstance(effect, RemoveFromAudience):
                key = (effect.audience, lead_id)
                joined = added.get(key)
                if joined is not None:
                    added[key] = (*joined[:4], item.at)
                else:
                    removed[key] = (effect.audience, lead_id, item.at)

        await queries.update_leads(connection, self.leads)
        await queries.update_lead_clocks(connection, self.clocks)
        await queries.insert_transitions(connection, transitions)
        await queries.insert_outbox(connection, outbox)
        await queries.insert_goals(connection, goals)
        await queries.add_to_audiences(connection, list(added.values()))
        await queries.remove_from_audiences(connection, list(removed.values()))
        # Exports send a member's identifiers as they are when its change is numbered:
        # new ones are sent again, to be matched under them.
        await queries.renumber_memberships(connection, self.identities_moved)
        await queries.delete_timers(connection, self.fired)
        await queries.delete_timers_of(
            connection, [ids[key] for key in self.cancelled if key in ids]
        )
        await queries.insert_timers(
            connection,
            [
                (
                    timer.due_at,
                    lead_id,
                    ids[(lead_id, timer.journey_id, timer.entry_no)],
                    timer.stage,
                    timer.epoch,
                    timer.transition,
                )
                for lead_id, timer in self.timers
            ],
        )
        await queries.mark_processed(connection, self.processed, self.now)
        if self.kpis:
            await record_batch(connection, counted, self.sources, self.sources_moved)

    async def _write_enrollments(self, connection: SqlConnection) -> None:
        new: list[EnrollmentKey] = []
        new_rows: list[queries.NewEnrollment] = []
        changed: list[queries.EnrollmentUpdate] = []
        for key, enrollment in self.enrollments.items():
            row_id = self.enrollment_ids.get(key)
            if row_id is None:
                new.append(key)
                new_rows.append(
                    (
                        key[0],
                        enrollment.journey_id,
                        enrollment.entry_no,
                        enrollment.version,
                        enrollment.stage,
                        enrollment.state,
                        enrollment.epoch,
                        enrollment.entered_at,
                        enrollment.stage_entered_at,
                        enrollment.ended_at,
                        enrollment.sequences,
                    )
                )
            else:
                changed.append(
                    (
                        row_id,
                        enrollment.version,
                        enrollment.stage,
                        enrollment.state,
                        enrollment.epoch,
                        enrollment.stage_entered_at,
                        enrollment.ended_at,
                        enrollment.sequences,
                    )
                )
        await queries.update_enrollments(connection, changed)
        new_ids = await queries.insert_enrollments(connection, new_rows)
        for key, row_id in zip(new, new_ids, strict=True):
            self.enrollment_ids[key] = row_id
