"""Instants stored as integer microseconds since the epoch: exact both ways."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from engine.db.types import EPOCH, from_micros, to_micros


def counted(moment: datetime) -> int:
    """Microseconds since the epoch, counted field by field."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


@pytest.mark.parametrize(
    "moment",
    [
        EPOCH,
        datetime(2026, 12, 6, 3, 0, 1, 123_456, tzinfo=UTC),
        datetime(1969, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),  # just before the epoch
        datetime(1, 1, 1, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        datetime(2026, 7, 1, 16, 0, tzinfo=ZoneInfo("Europe/Paris")),
    ],
)
def test_an_instant_survives_the_round_trip_to_the_microsecond(moment: datetime) -> None:
    assert to_micros(moment) == counted(moment)
    back = from_micros(to_micros(moment))
    assert back == moment
    assert back.tzinfo is UTC


def test_microseconds_count_one_by_one_across_midnight() -> None:
    start = datetime(2026, 3, 1, 23, 59, 59, 999_998, tzinfo=UTC)
    steps = [to_micros(start + timedelta(microseconds=n)) - to_micros(start) for n in range(4)]
    assert steps == [0, 1, 2, 3]
    assert to_micros(datetime(1970, 1, 2, tzinfo=UTC)) == 86_400_000_000
