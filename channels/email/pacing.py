"""When a nurture email may go: the frequency cap and the lead's sending window.

Pure rules, no I/O and no clock: the sender passes `now` and what it knows, and gets back the
earliest instant the next email may leave. Keeping them pure lets the same rules run in the
worker and in `cjm simulate`, and be checked minute by minute by property tests.

Windows are wall-clock times in the lead's zone, so the rules work on local times for days and
on UTC instants for order: two datetimes with the same `ZoneInfo` compare by wall clock and
ignore the offset, which is wrong across a daylight-saving change.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from engine.journey.model import WEEKDAYS, Window, format_duration, parse_duration

_CAP = re.compile(r"(\d+)\s*/\s*([^/\s]+)")
_CAP_FORM = "write a count, a slash and a duration, like 3/1d (at most 3 emails a day)"
_MAX_LIMIT = 999_999_999
# IANA names are short paths of letters, digits and - + _; anything else is refused before the
# zone database is asked, so user input never reaches the file system as a path.
_ZONE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+)*")
_MAX_ZONE_NAME = 64
# The system's own zone under a zone-like name: the server's clock, never a lead's.
_NOT_A_LEAD_ZONE = frozenset({"localtime"})

# A window comes round within a week; one whose whole day is skipped by a clock change (a window
# inside the spring-forward hour) comes round the week after.
_SEARCH = timedelta(days=16)
# Zones change offset months apart; sampling every few hours finds each change, then bisection
# finds its exact second (tz transitions fall on whole seconds).
_SAMPLE_SECONDS = 6 * 3600


@dataclass(frozen=True)
class FrequencyCap:
    """At most `limit` marketing emails per lead in any sliding `period`."""

    limit: int
    period: timedelta

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= _MAX_LIMIT:
            raise ValueError(f"a frequency cap allows 1 to {_MAX_LIMIT} emails, not {self.limit}")
        if self.period <= timedelta(0):
            raise ValueError(f"a frequency cap needs a period longer than zero, not {self.period}")

    @classmethod
    def parse(cls, text: str) -> FrequencyCap:
        """`3/1d` -> at most 3 emails a day; durations as in journey files (s, m, h, d, w)."""
        match = _CAP.fullmatch(text.strip())
        if match is None:
            raise ValueError(f"bad frequency cap {text!r}: {_CAP_FORM}")
        count, duration = match.groups()
        try:
            period = parse_duration(duration)
        except ValueError as error:
            raise ValueError(f"bad frequency cap {text!r}: {error}") from None
        # A count too long for any cap is refused before int() meets a 5,000-digit string.
        if len(count) > len(str(_MAX_LIMIT)) or not 1 <= int(count) <= _MAX_LIMIT:
            raise ValueError(
                f"bad frequency cap {text!r}: the count of emails must be 1 to {_MAX_LIMIT}"
            )
        return cls(int(count), period)

    def __str__(self) -> str:
        return f"{self.limit}/{format_duration(self.period)}"

    def next_allowed(self, sent: Iterable[datetime], now: datetime) -> datetime | None:
        """None when one more email may go at `now`; else the earliest instant after `now` when
        fewer than `limit` of the `sent` instants fall in (instant - period, instant].

        `sent` are aware datetimes, in any order, old ones included: only those in the period
        count.
        """
        instants = sorted(_utc(moment) for moment in sent)
        start = _utc(now)

        def count_at(moment: datetime) -> int:
            return bisect.bisect_right(instants, moment) - bisect.bisect_right(
                instants, moment - self.period
            )

        if count_at(start) < self.limit:
            return None
        # The count only drops when a send leaves the period, so the answer is one of those
        # departures: the earliest that brings the count under the limit (the last one does).
        departures = (sent_at + self.period for sent_at in instants)
        return next(t for t in departures if t > start and count_at(t) < self.limit)


def load_zone(name: str) -> ZoneInfo:
    """The IANA zone called `name` (`Europe/Berlin`, `UTC`), or ValueError saying what is wrong."""
    key = name.strip()
    if len(key) <= _MAX_ZONE_NAME and _ZONE_NAME.fullmatch(key) and key not in _NOT_A_LEAD_ZONE:
        try:
            return ZoneInfo(key)
        # Not found, a directory (`America`), a file that is not a zone: all the same to users.
        except (KeyError, ValueError, OSError):
            pass
    shown = name if len(name) <= _MAX_ZONE_NAME else name[:_MAX_ZONE_NAME] + "…"
    raise ValueError(f"unknown timezone {shown!r}: use an IANA name like Europe/Berlin or UTC")


def lead_zone(trait: object, default: ZoneInfo) -> ZoneInfo:
    """The zone of a lead's `timezone` trait, or `default` when it names none.

    Traits are whatever a website sent, so a bad one is not an error: the lead gets the
    configured default zone.
    """
    if not isinstance(trait, str):
        return default
    try:
        return load_zone(trait)
    except ValueError:
        return default


def next_opening(window: Window, zone: ZoneInfo, now: datetime) -> datetime:
    """`now` (in UTC) when it is inside `window` in `zone`, else the next instant it opens.

    An instant is inside when its local clock time is in [from, to) on a listed day (for a
    window past midnight, the day it opened). So a window opening at a time that the spring
    clock change skips opens at the first real instant after it, one opening at a time that
    the autumn change repeats opens at its first occurrence, and a window lying wholly in the
    skipped hour does not open that day.
    """
    start = _utc(now)
    if _is_open(window, start.astimezone(zone)):
        return start
    end = start + _SEARCH
    # The window can only open where the local clock reaches `from` or jumps.
    opens = time.fromisoformat(window.from_)
    first_day = start.astimezone(zone).date() - timedelta(days=1)
    days = (first_day + timedelta(days=offset) for offset in range(_SEARCH.days + 3))
    candidates = {moment for day in days for moment in _occurrences(day, opens, zone)}
    candidates.update(_clock_changes(zone, start, end))
    for candidate in sorted(moment for moment in candidates if start < moment <= end):
        if _is_open(window, candidate.astimezone(zone)):
            return candidate
    raise ValueError(f"the window {window.from_}-{window.to} never opens in {zone.key}")


def _utc(moment: datetime) -> datetime:
    if moment.utcoffset() is None:
        raise ValueError(f"{moment.isoformat()} has no timezone: pass aware datetimes")
    return moment.astimezone(UTC)


def _is_open(window: Window, local: datetime) -> bool:
    """Whether the wall-clock time `local` falls inside `window`."""
    opens, closes = time.fromisoformat(window.from_), time.fromisoformat(window.to)
    clock = local.time()
    weekday = local.weekday()
    if opens < closes:
        return opens <= clock < closes and WEEKDAYS[weekday] in window.days
    # Past midnight: the evening part belongs to today, the early hours to the day before.
    if clock >= opens:
        return WEEKDAYS[weekday] in window.days
    return clock < closes and WEEKDAYS[(weekday - 1) % 7] in window.days


def _occurrences(day: date, clock: time, zone: ZoneInfo) -> Iterator[datetime]:
    """The real instants (UTC) at which the local clock of `zone` shows `clock` on `day`:
    none in a skipped hour, two in a repeated one."""
    for fold in (0, 1):
        wall = datetime.combine(day, clock, tzinfo=zone).replace(fold=fold)
        instant = wall.astimezone(UTC)
        # Naive comparison: wall clocks only, which is the point here.
        if instant.astimezone(zone).replace(tzinfo=None) == wall.replace(tzinfo=None):
            yield instant


def _clock_changes(zone: ZoneInfo, start: datetime, end: datetime) -> Iterator[datetime]:
    """The instants in [start, end] at which `zone` changes its offset from UTC."""

    def offset(second: int) -> timedelta | None:
        return datetime.fromtimestamp(second, UTC).astimezone(zone).utcoffset()

    low = math.floor(start.timestamp())
    low_offset = offset(low)
    last = math.ceil(end.timestamp())
    while low < last:
        high = min(low + _SAMPLE_SECONDS, last)
        high_offset = offset(high)
        if high_offset != low_offset:
            before, after = low, high
            while after - before > 1:
                middle = (before + after) // 2
                if offset(middle) == low_offset:
                    before = middle
                else:
                    after = middle
            yield datetime.fromtimestamp(after, UTC)
        low, low_offset = high, high_offset
