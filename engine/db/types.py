"""Column types shared by every table."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, Dialect, Integer
from sqlalchemy.types import TypeDecorator

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

# SQLite only autoincrements an INTEGER PRIMARY KEY (the rowid); PostgreSQL gets a bigint.
BigId = BigInteger().with_variant(Integer(), "sqlite")


# Both conversions are exact integer arithmetic on timedelta, in one or two C calls:
# the worker makes several per row it reads or writes, and `timedelta(microseconds=)`
# with its keyword parsing took twice as long.
MICROSECOND = timedelta(microseconds=1)


def to_micros(moment: datetime) -> int:
    return (moment - EPOCH) // MICROSECOND


def from_micros(micros: int) -> datetime:
    return EPOCH + MICROSECOND * micros


class Instant(TypeDecorator[datetime]):
    """An aware UTC datetime stored as integer microseconds since the epoch.

    The same exact, sortable representation on SQLite (which has no datetime type)
    and PostgreSQL, and cheap to index and to subtract for time-in-stage figures.
    """

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> int | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to an Instant column")
        return to_micros(value)

    def process_result_value(self, value: int | None, dialect: Dialect) -> datetime | None:
        return None if value is None else from_micros(value)
