"""The offer store: granting codes for `offer.grant` effects, expiring them on time,
redeeming them once.

The `offers` table is its own timer: an unredeemed code past `expires_at` is found by
the expiry sweep through an index, so a restart loses no expiry. Every change happens
in the caller's transaction and reports itself as an internal event (`offer.granted`,
`offer.expired`, `offer.redeemed`) keyed by the code, so journeys can react and nothing
is reported twice.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection

from channels.offers.codes import make_code
from engine.db.queries import OUTBOX_PENDING, among, chunks, mark_outbox_dispatched, upsert
from engine.db.schema import enrollments, offer_codes, outbox
from engine.ingest.internal import Fact, emit, emit_all
from engine.journey.model import MAX_CODE_LENGTH, Journey
from engine.kpis.rollup import bump_offer, day_of
from engine.machine.book import JourneyBook

log = logging.getLogger("cjm.offers")

GRANT = "offer.grant"
GRANTED, REDEEMED, EXPIRED = "granted", "redeemed", "expired"
BATCH = 500
# A fresh code colliding with an existing one is a one-in-a-billion event; five in a row
# means the pattern is too short for the number of codes granted.
CODE_TRIES = 5
# What a code can look like: no spaces, no NUL (PostgreSQL refuses it in text).
_CODE = re.compile(rf"[^\s\x00]{{1,{MAX_CODE_LENGTH}}}")


async def grant_offers(
    connection: AsyncConnection, book: JourneyBook, now: datetime, limit: int = BATCH
) -> int:
    """Grant codes for up to `limit` pending `offer.grant` effects, in the caller's
    transaction; returns how many effects were handled."""
    claimed = await _claim_pending_grants(connection, limit)
    held = await _held_offers(connection, {row.lead_id for row in claimed})
    grants: list[_Grant] = []
    for row in claimed:
        journey = _journey(book, row.journey_id, row.version)
        offer = journey.offers.get(row.target) if journey is not None else None
        if offer is None:
            log.error("offer %s of %s is unknown here: not granted", row.target, row.journey_id)
            continue
        key = (row.lead_id, row.journey_id, row.target)
        if key in held:
            continue  # granting again gives the same code while it can still be used
        held.add(key)
        expires_at = offer.expires.at or now + (offer.expires.after or timedelta(0))
        grants.append(_Grant(row, offer.code, expires_at))
    codes = await _insert_unique(connection, grants, now)
    await emit_all(
        connection,
        [
            Fact(
                grant.row.lead_id,
                "offer.granted",
                {
                    "offer": grant.row.target,
                    "code": code,
                    "journey": grant.row.journey_id,
                    "expires_at": grant.expires_at.isoformat(),
                },
                now,
                f"offer.granted:{code}",
            )
            for grant, code in zip(grants, codes, strict=True)
        ],
    )
    await mark_outbox_dispatched(connection, [row.id for row in claimed], now)
    # Counted last, in key order: concurrent granters hold the counter rows only for
    # the end of their transactions, and always take them in the same order.
    granted = Counter((grant.row.journey_id, grant.row.target) for grant in grants)
    for (journey_id, offer_name), count in sorted(granted.items()):
        await bump_offer(connection, journey_id, day_of(now), offer_name, "granted", count)
    return len(claimed)


@dataclass(frozen=True)
class _Grant:
    row: Any  # the outbox effect, with the journey version
    pattern: str
    expires_at: datetime


async def expire_offers(connection: AsyncConnection, now: datetime, limit: int = BATCH) -> int:
    """Expire up to `limit` unredeemed codes whose time is up; returns how many."""
    due = list(
        await connection.execute(
            select(offer_codes)
            .where(offer_codes.c.status == GRANTED, offer_codes.c.expires_at <= now)
            .order_by(offer_codes.c.expires_at, offer_codes.c.id)
            .limit(limit)
            .with_for_update(skip_locked=True)
        )
    )
    if not due:
        return 0
    await connection.execute(
        update(offer_codes)
        .where(offer_codes.c.id.in_([row.id for row in due]))
        .values(status=EXPIRED, expired_at=now)
    )
    await emit_all(
        connection,
        [
            Fact(
                row.lead_id,
                "offer.expired",
                {"offer": row.offer, "code": row.code, "journey": row.journey_id},
                # When the offer ran out, even if the sweep comes later (the server was down).
                row.expires_at,
                f"offer.expired:{row.code}",
            )
            for row in due
        ],
    )
    # Counted last, in key order, as grants are.
    expired = Counter((row.journey_id, day_of(row.granted_at), row.offer) for row in due)
    for (journey_id, day, offer), count in sorted(expired.items()):
        await bump_offer(connection, journey_id, day, offer, "expired", count)
    return len(due)


@dataclass(frozen=True)
class Redemption:
    outcome: Literal["redeemed", "already_redeemed", "expired", "unknown"]
    offer: Any | None = None  # the row as it is now


async def redeem(
    connection: AsyncConnection, code: str, *, at: datetime, via: str, now: datetime
) -> Redemption:
    """Redeem `code` at `at` (the time of the purchase), exactly once. The purchase time
    decides: one made after the expiry is refused and the refusal counted, one made
    before it counts even if it reaches us after the expiry sweep."""
    row = await _lock_code(connection, code)
    if row is None:
        return Redemption("unknown")
    if row.status == REDEEMED:
        return Redemption("already_redeemed", row)
    if row.expires_at <= at:
        await connection.execute(
            update(offer_codes)
            .where(offer_codes.c.id == row.id)
            .values(refused=offer_codes.c.refused + 1)
        )
        await bump_offer(connection, row.journey_id, day_of(row.granted_at), row.offer, "refused")
        return Redemption("expired", await _lock_code(connection, row.code))
    await connection.execute(
        update(offer_codes)
        .where(offer_codes.c.id == row.id)
        .values(status=REDEEMED, redeemed_at=at, redeemed_by=via)
    )
    await bump_offer(connection, row.journey_id, day_of(row.granted_at), row.offer, "redeemed")
    await emit(
        connection,
        lead_id=row.lead_id,
        name="offer.redeemed",
        properties={"offer": row.offer, "code": row.code, "journey": row.journey_id},
        at=at,
        key=f"offer.redeemed:{row.code}",
    )
    return Redemption("redeemed", await _lock_code(connection, row.code))


async def redeem_coupons(connection: AsyncConnection, events: Sequence[Any], now: datetime) -> None:
    """The worker's hook: a tracked event whose `properties.coupon` is a code redeems it,
    in the transaction that applies the event (so exactly once). A coupon that cannot be
    redeemed is logged, never allowed to stop the worker: it is the customer's input."""
    for event in events:
        properties = (event.data or {}).get("properties") or {}
        coupon = properties.get("coupon") if isinstance(properties, dict) else None
        if not isinstance(coupon, str) or not _CODE.fullmatch(coupon.strip()):
            continue  # no code was ever made of this: not worth a query
        at = min(event.timestamp, now)
        try:
            async with connection.begin_nested():
                result = await redeem(
                    connection, coupon.strip(), at=at, via=event.message_id, now=now
                )
        except SQLAlchemyError:
            log.exception("coupon %r in event %s: redeeming failed", coupon, event.message_id)
            continue
        if result.outcome != "redeemed":
            log.info("coupon %r in event %s: %s", coupon, event.message_id, result.outcome)


async def latest_offers(
    connection: AsyncConnection, wanted: Collection[tuple[int, str]]
) -> dict[tuple[int, str], Any]:
    """The code each (lead, journey) of `wanted` holds, for its emails: the latest still
    usable. Pairs holding none are left out."""
    if not wanted:
        return {}
    found: dict[tuple[int, str], Any] = {}
    result = await connection.execute(
        select(offer_codes)
        .where(
            among(connection, offer_codes.c.lead_id, {lead_id for lead_id, _ in wanted}),
            offer_codes.c.status == GRANTED,
        )
        .order_by(offer_codes.c.granted_at, offer_codes.c.id)
    )
    for row in result:  # oldest first: the latest of each pair is written last
        key = (row.lead_id, row.journey_id)
        if key in wanted:
            found[key] = row
    return found


@dataclass(frozen=True)
class OfferFigures:
    journey: str
    offer: str
    granted: int
    redeemed: int
    expired: int
    refused_after_expiry: int

    @property
    def redemption_rate(self) -> float | None:
        return self.redeemed / self.granted if self.granted else None


async def offer_figures(connection: AsyncConnection, journey_id: str) -> list[OfferFigures]:
    """Per offer of the journey: codes granted, redeemed, expired, and late redemptions."""
    result = await connection.execute(
        select(
            offer_codes.c.offer,
            func.count(),
            func.count().filter(offer_codes.c.status == REDEEMED),
            func.count().filter(offer_codes.c.status == EXPIRED),
            func.coalesce(func.sum(offer_codes.c.refused), 0),
        )
        .where(offer_codes.c.journey_id == journey_id)
        .group_by(offer_codes.c.offer)
        .order_by(offer_codes.c.offer)
    )
    return [
        OfferFigures(journey_id, offer, int(granted), int(redeemed), int(expired), int(refused))
        for offer, granted, redeemed, expired, refused in result
    ]


# --- the queries -------------------------------------------------------------------------------


def _journey(book: JourneyBook, journey_id: str, version: int | None) -> Journey | None:
    if version is not None and (journey_id, version) in book.versions:
        return book.versions[(journey_id, version)]
    return book.current.get(journey_id)


async def _claim_pending_grants(connection: AsyncConnection, limit: int) -> list[Any]:
    result = await connection.execute(
        select(
            outbox.c.id,
            outbox.c.lead_id,
            outbox.c.enrollment_id,
            outbox.c.journey_id,
            outbox.c.target,
            enrollments.c.version,
        )
        .outerjoin(enrollments, enrollments.c.id == outbox.c.enrollment_id)
        .where(outbox.c.status == OUTBOX_PENDING, outbox.c.action == GRANT)
        .order_by(outbox.c.created_at, outbox.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=outbox)
    )
    return list(result)


async def _held_offers(
    connection: AsyncConnection, lead_ids: Collection[int]
) -> set[tuple[int, str, str]]:
    """(lead, journey, offer) of each code these leads hold and can still use. One that
    expired or was redeemed does not count: a lead back in the journey gets a new one.

    Asked by lead alone, the status tested here: SQLite, planning without statistics,
    answered `status = 'granted' AND lead_id IN (...)` by walking every usable code
    there is (the status index), a walk that grew with the codes granted."""
    held: set[tuple[int, str, str]] = set()
    for part in chunks(sorted(lead_ids)):
        result = await connection.execute(
            select(
                offer_codes.c.lead_id,
                offer_codes.c.journey_id,
                offer_codes.c.offer,
                offer_codes.c.status,
            ).where(among(connection, offer_codes.c.lead_id, part))
        )
        held.update(
            (row.lead_id, row.journey_id, row.offer) for row in result if row.status == GRANTED
        )
    return held


# Codes inserted per statement: a multi-row INSERT, so that RETURNING says which were free.
CODES_PER_INSERT = 1_000


async def _insert_unique(
    connection: AsyncConnection, grants: Sequence[_Grant], now: datetime
) -> list[str]:
    """Insert a fresh code for each grant; the codes, in the order of `grants`. A code
    taken already (or drawn twice in the batch) is drawn again, up to CODE_TRIES times."""
    codes: list[str | None] = [None] * len(grants)
    waiting = list(range(len(grants)))
    for _ in range(CODE_TRIES):
        if not waiting:
            break
        drawn: dict[str, int] = {}
        for index in waiting:
            drawn.setdefault(make_code(grants[index].pattern), index)
        rows = [
            {
                "code": code,
                "lead_id": grants[index].row.lead_id,
                "enrollment_id": grants[index].row.enrollment_id,
                "journey_id": grants[index].row.journey_id,
                "offer": grants[index].row.target,
                "status": GRANTED,
                "granted_at": now,
                "expires_at": grants[index].expires_at,
                "refused": 0,
            }
            for code, index in drawn.items()
        ]
        inserted: set[str] = set()
        for part in chunks(rows, CODES_PER_INSERT):
            inserted.update(
                await connection.scalars(
                    upsert(connection, offer_codes)
                    .values(list(part))
                    .on_conflict_do_nothing(index_elements=["code"])
                    .returning(offer_codes.c.code)
                )
            )
        for code in inserted:
            codes[drawn[code]] = code
        waiting = [index for index in waiting if codes[index] is None]
    if waiting:
        pattern = grants[waiting[0]].pattern
        raise RuntimeError(f"no free code for {pattern!r} after {CODE_TRIES} tries: lengthen it")
    return [code for code in codes if code is not None]


async def _lock_code(connection: AsyncConnection, code: str) -> Any | None:
    """The offer with this code (codes are upper case; a lower-cased one is found too)."""
    for candidate in dict.fromkeys((code, code.upper())):
        result = await connection.execute(
            select(offer_codes).where(offer_codes.c.code == candidate).with_for_update()
        )
        row = result.first()
        if row is not None:
            return row
    return None
