"""Nurture sequences: from `sequence.start` / `sequence.stop` effects to emails, step by step.

A started sequence becomes a `sequence_runs` row that walks the sequence's steps:
an `email` step queues one email and then waits until the sender has settled it
(sent, failed, suppressed or skipped); a `wait` step sets when the next step is due,
counted from when the previous email was settled. So a sequence arrives in order
whatever retries, sending windows or frequency caps delay one of its emails, and a
wait is never shortened by such a delay.

A stop (a `stop_on` event, an exit, the end of the journey, a `sequence.stop`
action, an unsubscribe) ends the run and cancels its emails not yet handed to SMTP.

Every write happens in the caller's transaction, keyed by the outbox row's
idempotency key, so running these functions again after a crash repeats nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.email.outbox import insert_emails
from engine.db.database import SqlConnection
from engine.db.queries import (
    OUTBOX_PENDING,
    chunks,
    execute_for_ids,
    mark_outbox_dispatched,
    micros,
    rows_for_ids,
    update_rows,
    upsert,
)
from engine.db.schema import enrollments, outbox, sequence_runs
from engine.journey.model import EmailStep, WaitStep
from engine.machine.book import JourneyBook

log = logging.getLogger("cjm.email")

START, STOP = "sequence.start", "sequence.stop"
ACTIVE, COMPLETED, STOPPED = "active", "completed", "stopped"
# Emails of a stopped run that have not reached the SMTP server yet.
CANCELLABLE = ("queued", "deferred")
CANCELLED = "cancelled"
BATCH = 500
UNKNOWN_VERSION_RETRY = timedelta(minutes=1)


# --- starting and stopping ---------------------------------------------------------------------


@dataclass
class _Pending:
    """The starts and stops of one dispatch batch, folded in outbox order."""

    active: set[tuple[int, str]]  # (enrollment, sequence) with a run active in the database
    starts: dict[tuple[int, str], dict[str, Any]] = field(default_factory=dict)
    stops: dict[tuple[int, str], str] = field(default_factory=dict)  # existing runs → reason
    ended: list[dict[str, Any]] = field(default_factory=list)  # runs started and stopped here

    def start(self, key: tuple[int, str], run: dict[str, Any]) -> None:
        # Starting a sequence that is running already changes nothing: the lead is
        # not sent the same nurture twice at once.
        if key in self.starts or (key in self.active and key not in self.stops):
            return
        self.starts[key] = run

    def stop(self, key: tuple[int, str], reason: str, now: datetime) -> None:
        started_here = self.starts.pop(key, None)
        if started_here is not None:
            # Started and stopped within one batch: recorded as a run that ended at once.
            self.ended.append(
                started_here | {"status": STOPPED, "stop_reason": reason, "ended_at": now}
            )
        elif key in self.active and key not in self.stops:
            self.stops[key] = reason


async def dispatch_sequences(connection: AsyncConnection, now: datetime, limit: int = BATCH) -> int:
    """Start and stop runs for up to `limit` pending `sequence.*` effects, in the caller's
    transaction; returns how many effects were dispatched."""
    claimed = await _claim_pending(connection, limit)
    if not claimed:
        return 0
    # A stop whose start another process is dispatching right now waits for it: applied
    # now, it would find no run, and the run would start after it and never stop.
    waiting = await _starts_elsewhere(connection, claimed)
    claimed = [row for row in claimed if (row.enrollment_id, row.target) not in waiting]
    keys = {(row.enrollment_id, row.target) for row in claimed}
    pending = _Pending(active=await _active_runs(connection, keys))
    for row in claimed:
        key = (row.enrollment_id, row.target)
        if row.action == START:
            if row.version is None:  # no enrollment row behind it: nothing to run
                continue
            pending.start(key, _new_run(row, now))
        else:
            pending.stop(key, stop_reason(row.idempotency_key), now)
    # Stops first: a sequence stopped and started again in one batch must not meet
    # its old active run in the unique index.
    await stop_runs(connection, pending.stops, now)
    runs = [*pending.ended, *pending.starts.values()]
    if runs:
        await connection.execute(
            upsert(connection, sequence_runs).on_conflict_do_nothing(
                index_elements=["idempotency_key"]
            ),
            runs,
        )
    await mark_outbox_dispatched(connection, [row.id for row in claimed], now)
    return len(claimed)


def stop_reason(idempotency_key: str) -> str:
    """Why a `sequence.stop` effect was made, read from its key (`{run}/{epoch}.{why}.{name}`
    for stops the engine decides, `{run}/{epoch}.{index}` for an `on_enter` action)."""
    parts = idempotency_key.partition("/")[2].split(".")
    if len(parts) >= 3 and parts[1] in ("stop", "exit", "end"):
        return {"stop": "stop_on", "exit": "exited", "end": "journey ended"}[parts[1]]
    return "sequence.stop"


def _new_run(row: Any, now: datetime) -> dict[str, Any]:
    return {
        "idempotency_key": row.idempotency_key,
        "lead_id": row.lead_id,
        "enrollment_id": row.enrollment_id,
        "journey_id": row.journey_id,
        "version": row.version,
        "sequence": row.target,
        "status": ACTIVE,
        "step": 0,
        "next_at": now,
        "stop_reason": None,
        "started_at": now,
        "updated_at": now,
        "ended_at": None,
    }


async def stop_runs(
    connection: AsyncConnection, runs: dict[tuple[int, str], str], now: datetime
) -> None:
    """Stop the active runs of these (enrollment, sequence) pairs, each for its reason,
    and cancel their emails that have not gone out."""
    by_reason: dict[str, list[tuple[int, str]]] = {}
    for key, reason in runs.items():
        by_reason.setdefault(reason, []).append(key)
    for reason, keys in by_reason.items():
        for part in chunks(keys):
            stopped = await connection.execute(
                update(sequence_runs)
                .where(
                    sequence_runs.c.status == ACTIVE,
                    tuple_(sequence_runs.c.enrollment_id, sequence_runs.c.sequence).in_(part),
                )
                .values(status=STOPPED, stop_reason=reason, ended_at=now, updated_at=now)
                .returning(sequence_runs.c.id)
            )
            await cancel_emails(connection, [run_id for (run_id,) in stopped], reason, now)


async def stop_lead_runs(
    connection: AsyncConnection, lead_ids: Collection[int], reason: str, now: datetime
) -> None:
    """Stop every active run of these leads, in every journey (an unsubscribe)."""
    stopped = await connection.execute(
        update(sequence_runs)
        .where(sequence_runs.c.status == ACTIVE, sequence_runs.c.lead_id.in_(list(lead_ids)))
        .values(status=STOPPED, stop_reason=reason, ended_at=now, updated_at=now)
        .returning(sequence_runs.c.id)
    )
    await cancel_emails(connection, [run_id for (run_id,) in stopped], reason, now)


async def cancel_emails(
    connection: SqlConnection, run_ids: list[int], reason: str, now: datetime
) -> None:
    """Cancel the runs' emails that have not gone out (plain SQL: it runs in the sender's
    `write_sql` transaction too)."""
    cancellable = ", ".join(f"'{status}'" for status in CANCELLABLE)
    await execute_for_ids(
        connection,
        f"UPDATE emails SET status = '{CANCELLED}', last_error = ?, updated_at = ?"
        f" WHERE sequence_run_id IN ({{ids}}) AND status IN ({cancellable})",
        (f"sequence stopped: {reason}", micros(now)),
        run_ids,
    )


# --- walking the steps -------------------------------------------------------------------------


async def advance_sequences(
    connection: AsyncConnection, book: JourneyBook, now: datetime, limit: int = BATCH
) -> int:
    """Carry out the due steps of up to `limit` runs, in the caller's transaction; returns
    how many runs were advanced."""
    due = await _claim_due_runs(connection, now, limit)
    queued: list[dict[str, Any]] = []
    # (step, next_at, status, ended_at, updated_at, id) per run carried on: one statement
    moved: list[tuple[Any, ...]] = []
    advanced = 0
    for run in due:
        journey = book.versions.get((run.journey_id, run.version))
        if journey is None:
            # A newer process published this version; it carries the run on. Looked at
            # again later here, so such runs cannot fill every claim meanwhile.
            log.warning(
                "sequence run %s: %s version %s is unknown here",
                run.id,
                run.journey_id,
                run.version,
            )
            await connection.execute(
                update(sequence_runs)
                .where(sequence_runs.c.id == run.id)
                .values(next_at=now + UNKNOWN_VERSION_RETRY)
            )
            continue
        advanced += 1
        sequence = journey.sequences.get(run.sequence)
        if sequence is None:  # the enrollment moved to a version without it before it started
            await stop_runs(connection, {(run.enrollment_id, run.sequence): "not in journey"}, now)
            continue
        step, at, status = run.step, run.next_at, ACTIVE
        while True:
            if step >= len(sequence.steps):
                status, at = COMPLETED, None
                break
            current = sequence.steps[step]
            step += 1
            if isinstance(current, WaitStep):
                at += current.wait
                if at > now:
                    break
            elif isinstance(current, EmailStep):
                queued.append(_step_email(run, step - 1, current.email, at, now))
                at = None  # until the sender settles the email
                break
        ended_at = now if status == COMPLETED else None
        moved.append((step, micros(at), status, micros(ended_at), micros(now), run.id))
    await update_rows(
        connection,
        sequence_runs,
        ("step", "next_at", "status", "ended_at", "updated_at"),
        ("id",),
        moved,
    )
    if queued:
        await insert_emails(connection, queued)
    return advanced


def _step_email(
    run: Any, index: int, template: str, due_at: datetime, now: datetime
) -> dict[str, Any]:
    return {
        # (lead, journey entry, sequence step): the run's key names the entry and sequence.
        "idempotency_key": f"{run.idempotency_key}/step.{index}",
        "lead_id": run.lead_id,
        "enrollment_id": run.enrollment_id,
        "journey_id": run.journey_id,
        "stage": run.stage,
        "template": template,
        "status": "queued",
        "due_at": due_at,
        "attempts": 0,
        "created_at": now,
        "updated_at": now,
        "sequence_run_id": run.id,
    }


async def steps_settled(
    connection: SqlConnection, run_ids: Collection[int], *, stop: str | None, now: datetime
) -> None:
    """The sender settled the email of each run's current step: the runs go on from now,
    or stop (`stop` gives the reason: the address is suppressed, say). Plain SQL, for the
    sender's `write_sql` transaction."""
    if not run_ids:
        return
    at = micros(now)
    settled = f"WHERE id {{among}} AND status = '{ACTIVE}' AND next_at IS NULL"
    if stop is None:
        await execute_for_ids(
            connection,
            f"UPDATE sequence_runs SET next_at = ?, updated_at = ? {settled}",
            (at, at),
            list(run_ids),
        )
        return
    await execute_for_ids(
        connection,
        f"UPDATE sequence_runs SET status = '{STOPPED}', stop_reason = ?, ended_at = ?,"
        f" updated_at = ? {settled}",
        (stop, at, at),
        list(run_ids),
    )
    await cancel_emails(connection, list(run_ids), stop, now)


# --- the queries -------------------------------------------------------------------------------


async def _claim_pending(connection: AsyncConnection, limit: int) -> list[Any]:
    """The oldest pending `sequence.*` rows, locked, with their enrollment's version."""
    result = await connection.execute(
        select(
            outbox.c.id,
            outbox.c.idempotency_key,
            outbox.c.lead_id,
            outbox.c.enrollment_id,
            outbox.c.journey_id,
            outbox.c.action,
            outbox.c.target,
            enrollments.c.version,
        )
        .outerjoin(enrollments, enrollments.c.id == outbox.c.enrollment_id)
        .where(outbox.c.status == OUTBOX_PENDING, outbox.c.action.in_((START, STOP)))
        .order_by(outbox.c.created_at, outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=outbox)
    )
    return list(result)


async def _starts_elsewhere(
    connection: AsyncConnection, claimed: list[Any]
) -> set[tuple[int, str]]:
    """The (enrollment, sequence) pairs stopped in `claimed` whose earlier start is still
    pending outside it: held by another dispatcher, not yet committed.

    Read by lead (a lead has a few outbox rows), the rest tested here: SQLite, planning
    without statistics, answered `status = 'pending' AND action = ? AND enrollment_id
    IN (...)` by walking every pending outbox row (the status index)."""
    last_stop: dict[tuple[int, str], int] = {}
    stopping: set[int] = set()
    for row in claimed:
        if row.action == STOP:
            last_stop[(row.enrollment_id, row.target)] = row.id
            stopping.add(row.lead_id)
    if not last_stop:
        return set()
    mine = {row.id for row in claimed}
    rows = await rows_for_ids(
        connection,
        "SELECT id, enrollment_id, target, action, status FROM outbox WHERE lead_id IN ({ids})",
        (),
        sorted(stopping),
    )
    return {
        (enrollment_id, target)
        for row_id, enrollment_id, target, action, status in rows
        if status == OUTBOX_PENDING
        and action == START
        and row_id not in mine
        and row_id < last_stop.get((enrollment_id, target), 0)
    }


async def _active_runs(
    connection: AsyncConnection, keys: Collection[tuple[int, str]]
) -> set[tuple[int, str]]:
    """The (enrollment, sequence) pairs among `keys` that have an active run.

    Read through the index of active runs by enrollment (`uq_sequence_runs_active`),
    named on SQLite: planning without statistics, it walked every active run there is
    (the status index) for a batch of five enrollments or more, a walk that grew with
    the runs under way. Its condition is written as the index's own, a literal, so
    that both databases may use it."""
    named = " INDEXED BY uq_sequence_runs_active" if connection.dialect.name == "sqlite" else ""
    rows = await rows_for_ids(
        connection,
        f"SELECT enrollment_id, sequence FROM sequence_runs{named}"
        f" WHERE status = '{ACTIVE}' AND enrollment_id IN ({{ids}})",
        (),
        sorted({enrollment for enrollment, _ in keys}),
    )
    return {(enrollment, sequence) for enrollment, sequence in rows} & set(keys)


async def _claim_due_runs(connection: AsyncConnection, now: datetime, limit: int) -> list[Any]:
    """Active runs whose next step is due, locked, with the stage their enrollment is in."""
    result = await connection.execute(
        select(
            sequence_runs.c.id,
            sequence_runs.c.idempotency_key,
            sequence_runs.c.lead_id,
            sequence_runs.c.enrollment_id,
            sequence_runs.c.journey_id,
            sequence_runs.c.version,
            sequence_runs.c.sequence,
            sequence_runs.c.step,
            sequence_runs.c.next_at,
            enrollments.c.stage,
        )
        .outerjoin(enrollments, enrollments.c.id == sequence_runs.c.enrollment_id)
        .where(sequence_runs.c.status == ACTIVE, sequence_runs.c.next_at <= now)
        .order_by(sequence_runs.c.next_at, sequence_runs.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=sequence_runs)
    )
    return list(result)
