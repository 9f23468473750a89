"""The rows one batch of work writes, gathered in memory and written in bulk.

A batch of leads ends in one transaction: new and changed enrollments, history,
timers, channel actions for the outbox, audience memberships, goals, lead traits.
Either all of it is committed with the events marked processed, or none of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncConnection

from engine.db import queries
from engine.kpis.rollup import record_batch
from engine.kpis.sources import FirstTouch
from engine.machine.lead import JourneyEffect, Outcome, PendingTimer
from engine.machine.values import (
    AddToAudience,
    ChannelAction,
    Enrollment,
    ReachGoal,
    RemoveFromAudience,
    Transitioned,
)

EnrollmentKey = tuple[int, str, int]  # lead id, journey id, entry number


def enrollment_from_row(row: Any) -> Enrollment:
    return Enrollment(
        journey_id=row.journey_id,
        version=row.version,
        entry_no=row.entry_no,
        stage=row.stage,
        state=row.state,
        epoch=row.epoch,
        entered_at=row.entered_at,
        stage_entered_at=row.stage_entered_at,
        ended_at=row.ended_at,
        sequences=tuple(row.sequences or ()),
    )


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
        self.leads: list[dict[str, Any]] = []
        self.enrollments: dict[EnrollmentKey, Enrollment] = {}
        self.effects: list[tuple[int, JourneyEffect]] = []
        self.timers: list[tuple[int, PendingTimer]] = []
        self.fired: list[int] = []
        self.cancelled: set[EnrollmentKey] = set()
        self.processed: list[int] = []

    @property
    def leads_count(self) -> int:
        return len(self.leads)

    def add_outcome(
        self,
        lead_id: int,
        outcome: Outcome,
        event_ids: Sequence[int],
        first_touch: FirstTouch,
        first_touch_moved: bool,
    ) -> None:
        traits = dict(outcome.lead.traits)
        self.leads.append(
            {
                "id": lead_id,
                "traits": traits,
                "email": _email_of(traits),
                "watermark": outcome.lead.watermark,
                "first_source": first_touch.source,
                "first_source_at": first_touch.at,
                "updated_at": self.now,
            }
        )
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

    async def write(self, connection: AsyncConnection) -> None:
        await self._write_enrollments(connection)
        ids = self.enrollment_ids
        transitions: list[dict[str, Any]] = []
        outbox: list[dict[str, Any]] = []
        goals: list[dict[str, Any]] = []
        # The last audience change per (audience, lead) wins; an add and remove in one
        # batch still leaves both times on the membership.
        audiences: dict[tuple[str, int], dict[str, Any]] = {}
        for lead_id, item in self.effects:
            enrollment_id = ids[(lead_id, item.journey_id, item.entry_no)]
            effect = item.effect
            if isinstance(effect, Transitioned):
                transitions.append(
                    {
                        "enrollment_id": enrollment_id,
                        "journey_id": item.journey_id,
                        "from_stage": effect.from_stage,
                        "to_stage": effect.to_stage,
                        "at": effect.at,
                        "cause": effect.cause.as_dict(),
                    }
                )
            elif isinstance(effect, ChannelAction):
                outbox.append(
                    {
                        "idempotency_key": f"{enrollment_id}/{effect.key}",
                        "lead_id": lead_id,
                        "enrollment_id": enrollment_id,
                        "journey_id": item.journey_id,
                        "action": effect.action,
                        "target": effect.target,
                        "status": queries.OUTBOX_PENDING,
                        "created_at": item.at,
                        "updated_at": item.at,
                    }
                )
            elif isinstance(effect, ReachGoal):
                goals.append(
                    {
                        "enrollment_id": enrollment_id,
                        "journey_id": item.journey_id,
                        "message_id": effect.message_id,
                        "at": effect.at,
                        "value": effect.value,
                    }
                )
            elif isinstance(effect, AddToAudience):
                audiences[(effect.audience, lead_id)] = {
                    "audience": effect.audience,
                    "lead_id": lead_id,
                    "journey_id": item.journey_id,
                    "added_at": item.at,
                    "removed_at": None,
                }
            elif isinstance(effect, RemoveFromAudience):
                key = (effect.audience, lead_id)
                added = audiences.get(key)
                if added is not None:
                    added["removed_at"] = item.at
                else:
                    audiences[key] = {
                        "audience": effect.audience,
                        "lead_id": lead_id,
                        "removed_at": item.at,
                    }

        await queries.update_leads(connection, self.leads)
        await queries.insert_transitions(connection, transitions)
        await queries.insert_outbox(connection, outbox)
        await queries.insert_goals(connection, goals)
        await queries.add_to_audiences(
            connection, [row for row in audiences.values() if "added_at" in row]
        )
        await queries.remove_from_audiences(
            connection, [row for row in audiences.values() if "added_at" not in row]
        )
        await queries.delete_timers(connection, self.fired)
        await queries.delete_timers_of(
            connection, [ids[key] for key in self.cancelled if key in ids]
        )
        await queries.insert_timers(
            connection,
            [
                {
                    "due_at": timer.due_at,
                    "lead_id": lead_id,
                    "enrollment_id": ids[(lead_id, timer.journey_id, timer.entry_no)],
                    "stage": timer.stage,
                    "epoch": timer.epoch,
                    "transition": timer.transition,
                }
                for lead_id, timer in self.timers
            ],
        )
        await queries.mark_processed(connection, self.processed, self.now)
        if self.kpis:
            await record_batch(connection, self.effects, self.sources, self.sources_moved)

    async def _write_enrollments(self, connection: AsyncConnection) -> None:
        new: list[tuple[EnrollmentKey, dict[str, Any]]] = []
        changed: list[dict[str, Any]] = []
        for key, enrollment in self.enrollments.items():
            values = {
                "version": enrollment.version,
                "stage": enrollment.stage,
                "state": enrollment.state,
                "epoch": enrollment.epoch,
                "stage_entered_at": enrollment.stage_entered_at,
                "ended_at": enrollment.ended_at,
                "sequences": list(enrollment.sequences),
            }
            row_id = self.enrollment_ids.get(key)
            if row_id is None:
                values.update(
                    lead_id=key[0],
                    journey_id=enrollment.journey_id,
                    entry_no=enrollment.entry_no,
                    entered_at=enrollment.entered_at,
                )
                new.append((key, values))
            else:
                changed.append({"id": row_id, **values})
        await queries.update_enrollments(connection, changed)
        new_ids = await queries.insert_enrollments(connection, [values for _, values in new])
        for (key, _), row_id in zip(new, new_ids, strict=True):
            self.enrollment_ids[key] = row_id
