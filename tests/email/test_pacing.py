"""Pacing: the frequency cap and the sending window decide when a nurture email may go.

Instants are UTC; windows are read on the lead's local clock. The daylight-saving examples use
Europe/Berlin in 2026: clocks go from 02:00 to 03:00 on Sunday 29 March (01:00 UTC) and from
03:00 back to 02:00 on Sunday 25 October (01:00 UTC).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from channels.email.pacing import FrequencyCap, lead_zone, load_zone, next_opening
from engine.journey.model import WEEKDAYS, Window

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
NOW = datetime(2026, 6, 10, 12, 0, tzinfo=UTC)  # a Wednesday
UTC_ZONE = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
TOKYO = ZoneInfo("Asia/Tokyo")
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)
WORKING_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat")


def utc(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def window(opens: str, closes: str, days: Iterable[str] = WEEKDAYS) -> Window:
    return Window.model_validate({"from": opens, "to": closes, "days": tuple(days)})


# --- the frequency cap: parsing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [("3/1d", 3, DAY), ("1/90s", 1, timedelta(seconds=90)), (" 10 / 12h ", 10, 12 * HOUR)],
)
def test_cap_reads_a_count_and_a_duration(text: str, limit: int, period: timedelta) -> None:
    assert FrequencyCap.parse(text) == FrequencyCap(limit, period)


def test_cap_prints_as_it_is_written() -> None:
    assert str(FrequencyCap.parse("3/1d")) == "3/1d"
    assert f"frequency cap {FrequencyCap(2, 7 * DAY)}" == "frequency cap 2/1w"


@pytest.mark.parametrize(
    "text", ["", "3", "3/", "/1d", "three/1d", "-1/1d", "3 a day", "3/1d/2", "3/1 d"]
)
def test_cap_that_is_not_count_slash_duration_shows_the_expected_form(text: str) -> None:
    with pytest.raises(
        ValueError, match=r"bad frequency cap .*like 3/1d \(at most 3 emails a day\)"
    ):
        FrequencyCap.parse(text)


@pytest.mark.parametrize("text", ["3/0d", "3/1x", "3/1.5h", "3/99999999w"])
def test_cap_with_a_bad_duration_says_what_is_wrong_with_it(text: str) -> None:
    with pytest.raises(ValueError, match=r"bad frequency cap .*: bad duration"):
        FrequencyCap.parse(text)


@pytest.mark.parametrize("text", ["0/1d", "1000000000/1d", "9" * 5000 + "/1d"])
def test_cap_count_must_be_at_least_one_and_sane(text: str) -> None:
    with pytest.raises(ValueError, match="the count of emails must be 1 to 999999999"):
        FrequencyCap.parse(text)


def test_cap_built_directly_is_checked_too() -> None:
    with pytest.raises(ValueError, match="allows 1 to"):
        FrequencyCap(0, DAY)
    with pytest.raises(ValueError, match="longer than zero"):
        FrequencyCap(3, timedelta(0))


# --- the frequency cap: when the next email may go ------------------------------------------------


def test_under_the_cap_an_email_may_go_now() -> None:
    cap = FrequencyCap(3, DAY)

    assert cap.next_allowed([NOW - 5 * HOUR, NOW - HOUR], NOW) is None


def test_with_no_sends_an_email_may_go_now() -> None:
    assert FrequencyCap(1, DAY).next_allowed([], NOW) is None


def test_at_the_cap_the_next_email_waits_until_the_oldest_leaves_the_period() -> None:
    cap = FrequencyCap(3, DAY)
    sent = [NOW - HOUR, NOW - 20 * HOUR, NOW - 10 * HOUR]  # any order

    assert cap.next_allowed(sent, NOW) == NOW - 20 * HOUR + DAY


def test_sends_before_the_period_are_ignored() -> None:
    cap = FrequencyCap(2, DAY)

    assert cap.next_allowed([NOW - 2 * DAY, NOW - 30 * HOUR, NOW - HOUR], NOW) is None


def test_a_send_exactly_one_period_ago_has_left_it() -> None:
    assert FrequencyCap(1, DAY).next_allowed([NOW - DAY], NOW) is None


def test_an_email_being_sent_now_counts() -> None:
    assert FrequencyCap(1, DAY).next_allowed([NOW], NOW) == NOW + DAY


def test_over_the_cap_the_wait_lasts_until_enough_sends_have_left() -> None:
    cap = FrequencyCap(2, DAY)
    sent = [NOW - 23 * HOUR, NOW - 22 * HOUR, NOW - 21 * HOUR]  # a cap lowered after these went

    assert cap.next_allowed(sent, NOW) == NOW - 22 * HOUR + DAY


def test_sends_in_other_timezones_are_compared_as_instants() -> None:
    cap = FrequencyCap(1, DAY)
    sent_in_tokyo = (NOW - 2 * HOUR).astimezone(TOKYO)

    assert cap.next_allowed([sent_in_tokyo], NOW) == NOW + 22 * HOUR


def test_naive_instants_are_refused_rather_than_guessed() -> None:
    with pytest.raises(ValueError, match="has no timezone"):
        FrequencyCap(1, DAY).next_allowed([], NOW.replace(tzinfo=None))


def sends_in(sent: list[datetime], moment: datetime, period: timedelta) -> int:
    return sum(1 for s in sent if moment - period < s <= moment)


@SETTINGS
@given(
    limit=st.integers(1, 4),
    period_seconds=st.integers(1, 5000),
    offsets=st.lists(st.integers(-10_000, 100), max_size=10),
)
def test_next_allowed_is_the_earliest_instant_under_the_cap(
    limit: int, period_seconds: int, offsets: list[int]
) -> None:
    period = timedelta(seconds=period_seconds)
    sent = [NOW + timedelta(seconds=offset) for offset in offsets]

    allowed = FrequencyCap(limit, period).next_allowed(sent, NOW)

    if allowed is None:
        assert sends_in(sent, NOW, period) < limit
        return
    assert allowed > NOW
    assert sends_in(sent, allowed, period) < limit
    # The count changes only where a send enters or leaves the period: at none of those points
    # before the answer, nor just before it, was there room.
    changes = set(sent) | {s + period for s in sent} | {allowed - timedelta(microseconds=1)}
    for moment in changes:
        if NOW <= moment < allowed:
            assert sends_in(sent, moment, period) >= limit


# --- zones ----------------------------------------------------------------------------------------


def test_load_zone_finds_an_iana_zone() -> None:
    assert load_zone("Europe/Moscow") == ZoneInfo("Europe/Moscow")
    assert load_zone("UTC") == ZoneInfo("UTC")


@pytest.mark.parametrize(
    "name", ["", "Mars/Olympus", "europe/moscow", "../etc/passwd", "/etc/localtime", "America"]
)
def test_load_zone_refuses_what_is_not_a_zone_and_names_the_expected_form(name: str) -> None:
    with pytest.raises(ValueError, match=r"unknown timezone .*use an IANA name like Europe/Berlin"):
        load_zone(name)


def test_lead_zone_is_the_lead_timezone_trait() -> None:
    assert lead_zone("Asia/Tokyo", BERLIN) == TOKYO


@pytest.mark.parametrize(
    "trait",
    [
        None,
        42,
        ["Asia/Tokyo"],
        "",
        "   ",
        "Mars/Olympus",
        "../etc/passwd",
        "/etc/passwd",
        "Europe/../../etc/passwd",
        "America",
        "Europe/Berlin\x00",
        "localtime",
        "x" * 10_000,
    ],
)
def test_lead_zone_falls_back_to_the_default_for_anything_else(trait: object) -> None:
    assert lead_zone(trait, BERLIN) is BERLIN


# --- the sending window: examples -----------------------------------------------------------------


def test_inside_the_window_the_email_goes_now() -> None:
    assert next_opening(window("09:00", "20:00", WORKING_DAYS), UTC_ZONE, NOW) == NOW


def test_before_the_window_opens_the_email_waits_for_it_the_same_day() -> None:
    early = utc("2026-06-10T07:15")

    assert next_opening(window("09:00", "20:00"), UTC_ZONE, early) == utc("2026-06-10T09:00")


def test_after_the_window_closes_the_email_waits_for_the_next_day() -> None:
    late = utc("2026-06-10T20:00")  # the end of the window is not in it

    assert next_opening(window("09:00", "20:00"), UTC_ZONE, late) == utc("2026-06-11T09:00")


def test_a_day_not_listed_is_skipped() -> None:
    saturday_night = utc("2026-06-13T21:00")

    assert next_opening(window("09:00", "20:00", WORKING_DAYS), UTC_ZONE, saturday_night) == utc(
        "2026-06-15T09:00"
    )


@pytest.mark.parametrize(
    ("now", "opening"),
    [
        ("2026-06-12T19:00", "2026-06-12T20:00"),  # Friday, before it opens
        ("2026-06-12T23:30", "2026-06-12T23:30"),  # Friday night
        ("2026-06-13T07:59", "2026-06-13T07:59"),  # Saturday morning still belongs to Friday
        ("2026-06-13T08:00", "2026-06-19T20:00"),  # closed: next Friday
        ("2026-06-11T23:00", "2026-06-12T20:00"),  # Thursday night is not Friday's
        ("2026-06-12T03:00", "2026-06-12T20:00"),  # nor are Friday's early hours
    ],
)
def test_a_window_past_midnight_belongs_to_the_day_it_opens(now: str, opening: str) -> None:
    friday_nights = window("20:00", "08:00", ["fri"])

    assert next_opening(friday_nights, UTC_ZONE, utc(now)) == utc(opening)


def test_the_window_is_read_on_the_lead_clock() -> None:
    half_past_nine_in_tokyo = utc("2026-06-10T00:30")
    office_hours = window("09:00", "20:00")

    assert next_opening(office_hours, TOKYO, half_past_nine_in_tokyo) == half_past_nine_in_tokyo
    assert next_opening(office_hours, UTC_ZONE, half_past_nine_in_tokyo) == utc("2026-06-10T09:00")


def test_a_window_opening_in_the_skipped_hour_opens_when_the_clock_jumps() -> None:
    one_in_the_night = utc("2026-03-29T00:00")  # 01:00 in Berlin, an hour before the jump

    assert next_opening(window("02:30", "09:00"), BERLIN, one_in_the_night) == utc(
        "2026-03-29T01:00"  # 03:00 summer time
    )


def test_a_window_wholly_in_the_skipped_hour_does_not_open_that_day() -> None:
    half_past_one = utc("2026-03-29T00:30")

    assert next_opening(window("02:00", "02:45"), BERLIN, half_past_one) == utc(
        "2026-03-30T00:00"  # Monday 02:00 summer time
    )


def test_a_window_opening_in_the_repeated_hour_opens_at_its_first_occurrence() -> None:
    two_in_the_night = utc("2026-10-25T00:00")  # 02:00 summer time

    assert next_opening(window("02:30", "09:00"), BERLIN, two_in_the_night) == utc(
        "2026-10-25T00:30"  # 02:30 summer time, not 02:30 winter time an hour later
    )


def test_in_the_repeated_hour_the_local_clock_decides() -> None:
    second_ten_past_two = utc("2026-10-25T01:10")  # 02:10 winter time, after 02:59 summer time

    assert next_opening(window("02:30", "09:00"), BERLIN, second_ten_past_two) == utc(
        "2026-10-25T01:30"
    )


def test_naive_now_is_refused_rather_than_guessed() -> None:
    with pytest.raises(ValueError, match="has no timezone"):
        next_opening(window("09:00", "20:00"), UTC_ZONE, NOW.replace(tzinfo=None))


# --- the sending window: properties ---------------------------------------------------------------

# Zones with summer time on either hemisphere, a half-hour change (Lord Howe), changes at
# midnight (Santiago), odd offsets (Kathmandu, St John's) and none at all.
ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "America/St_Johns",
    "America/Santiago",
    "Australia/Lord_Howe",
    "Asia/Kathmandu",
    "Asia/Tokyo",
)
# The clock changes of those zones in 2026, as UTC instants: random cases are drawn around them
# too, with windows opening near them, since the hour around a change is where schedules break.
CLOCK_CHANGES = (
    ("Europe/Berlin", "2026-03-29T01:00"),
    ("Europe/Berlin", "2026-10-25T01:00"),
    ("America/New_York", "2026-03-08T07:00"),
    ("America/New_York", "2026-11-01T06:00"),
    ("America/St_Johns", "2026-03-08T05:30"),
    ("America/St_Johns", "2026-11-01T04:30"),
    ("America/Santiago", "2026-04-05T03:00"),
    ("America/Santiago", "2026-09-06T04:00"),
    ("Australia/Lord_Howe", "2026-04-04T15:00"),
    ("Australia/Lord_Howe", "2026-10-03T15:30"),
)


def is_open(opening: Window, local: datetime) -> bool:
    """The window's meaning, written plainly: the clock time is in it on a day it opens."""
    opens, closes = time.fromisoformat(opening.from_), time.fromisoformat(opening.to)
    clock = local.time()
    if opens < closes:
        opened_on: date = local.date()
        inside = opens <= clock < closes
    else:
        opened_on = local.date() if clock >= opens else local.date() - DAY
        inside = clock >= opens or clock < closes
    return inside and WEEKDAYS[opened_on.weekday()] in opening.days


def clock_at(moment: datetime) -> str:
    return f"{moment.hour:02}:{moment.minute:02}"


clocks = st.builds(
    lambda hour, minute: f"{hour:02}:{minute:02}",
    st.integers(0, 23),
    st.sampled_from([0, 15, 30, 45, 59]),
)
weekdays = st.sets(st.sampled_from(WEEKDAYS), min_size=1).map(
    lambda days: [day for day in WEEKDAYS if day in days]
)


@st.composite
def anywhere(draw: st.DrawFn) -> tuple[ZoneInfo, datetime, Window]:
    """Any of the zones, any instant of fifteen years, any window."""
    zone = ZoneInfo(draw(st.sampled_from(ZONES)))
    now = draw(st.datetimes(datetime(2020, 1, 1), datetime(2035, 12, 31), timezones=st.just(UTC)))
    opens, closes = draw(clocks), draw(clocks)
    assume(opens != closes)
    return zone, now, window(opens, closes, draw(weekdays))


@st.composite
def around_a_clock_change(draw: st.DrawFn) -> tuple[ZoneInfo, datetime, Window]:
    """Hours before to hours after a change, and a window open that day, opening within an
    hour and a half of the clock time the change leaves: in, before or after a skipped or
    repeated hour, so that it is often still to open at `now`.
    """
    name, change_text = draw(st.sampled_from(CLOCK_CHANGES))
    zone, change = ZoneInfo(name), utc(change_text)
    left_at = (change - timedelta(seconds=1)).astimezone(zone) + timedelta(seconds=1)
    opens_at = left_at + draw(st.sampled_from(range(-6, 7))) * timedelta(minutes=15)
    closes_at = opens_at + draw(st.sampled_from(range(1, 65))) * timedelta(minutes=15)
    # Half the time in the hour after the change, where a repeated hour runs a second time.
    minutes = draw(st.sampled_from(range(-3 * 60, 2 * 60)) | st.sampled_from(range(60)))
    now = change + timedelta(minutes=minutes)
    days = set(draw(weekdays)) | {WEEKDAYS[left_at.weekday()]}
    return (
        zone,
        now,
        window(clock_at(opens_at), clock_at(closes_at), sorted(days, key=WEEKDAYS.index)),
    )


def assert_first_opening(zone: ZoneInfo, now: datetime, opening_window: Window) -> None:
    opening = next_opening(opening_window, zone, now)

    assert opening.utcoffset() == timedelta(0)
    assert opening >= now
    assert is_open(opening_window, opening.astimezone(zone))
    assert opening == now or not is_open(opening_window, now.astimezone(zone))
    # The window opens and closes on whole minutes of UTC (every offset and clock change of
    # these zones is in whole minutes), so a window open before `opening` would be open at one
    # of the minutes between.
    moment = now.replace(second=0, microsecond=0) + MINUTE
    while moment < opening:
        assert not is_open(opening_window, moment.astimezone(zone)), moment
        moment += MINUTE


@SETTINGS
@given(case=anywhere())
def test_next_opening_is_the_first_instant_inside_the_window(
    case: tuple[ZoneInfo, datetime, Window],
) -> None:
    assert_first_opening(*case)


@SETTINGS
@given(case=around_a_clock_change())
def test_next_opening_is_the_first_instant_inside_the_window_across_clock_changes(
    case: tuple[ZoneInfo, datetime, Window],
) -> None:
    assert_first_opening(*case)
