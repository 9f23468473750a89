"""First touch: the campaign source a lead was first seen with, for the KPI split."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

# As the `source` column holds it.
MAX_SOURCE_LENGTH = 200


@dataclass(frozen=True, slots=True)
class FirstTouch:
    """The earliest `context.campaign.source` seen for a lead, and that event's time."""

    source: str | None = None
    at: datetime | None = None


def campaign_source(context: Mapping[str, Any] | None) -> str | None:
    """`context.campaign.source` (utm_source), trimmed; None when absent or not text."""
    campaign = context.get("campaign") if isinstance(context, Mapping) else None
    source = campaign.get("source") if isinstance(campaign, Mapping) else None
    if not isinstance(source, str) or not source.strip():
        return None
    return source.strip()[:MAX_SOURCE_LENGTH]


def first_touch(
    known: FirstTouch, events: Iterable[tuple[datetime, Mapping[str, Any] | None]]
) -> FirstTouch:
    """The first touch after these (timestamp, context) events: an event from before the
    known first touch replaces it, so a late event is attributed as if it came in time.
    `known` itself when none does."""
    found = known
    for timestamp, context in events:
        source = campaign_source(context)
        if source is not None and (found.at is None or timestamp < found.at):
            found = FirstTouch(source, timestamp)
    return found
