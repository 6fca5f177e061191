"""Maintenance windows (weekly, in UTC) and the rotation schedule."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.schedule import (
    in_window,
    next_rotation,
    next_window_start,
    window_opening_at_or_before,
)
from kustody.domain.specs import MaintenanceWindow

UTC = dt.UTC
MON = dt.datetime(2024, 1, 1, tzinfo=UTC)  # a Monday, 00:00 UTC


def at(day: int, hour: int = 0, minute: int = 0) -> dt.datetime:
    """``day`` days after Monday 2024-01-01 (0 = Mon ... 6 = Sun, 7 = next Mon)."""
    return MON + dt.timedelta(days=day, hours=hour, minutes=minute)


def window(days: set[int], start: str, length: str) -> MaintenanceWindow:
    names = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    return MaintenanceWindow.parse(
        {"days": [names[d] for d in sorted(days)], "start": start, "duration": length}
    )


# The example policy: Tue, Wed, Thu 02:00-05:00 UTC.
TUE_WED_THU = window({1, 2, 3}, "02:00", "3h")


def test_no_window_is_always_open() -> None:
    assert in_window(None, at(0, 12))
    assert next_window_start(None, at(0, 12)) == at(0, 12)


@pytest.mark.parametrize(
    ("now", "expected"),
    [
        (at(1, 2), True),  # Tue 02:00, the opening itself
        (at(1, 4, 59), True),
        (at(1, 5), False),  # the end is exclusive
        (at(1, 1, 59), False),
        (at(0, 3), False),  # Monday is not a window day
        (at(3, 3), True),  # Thursday
        (at(4, 3), False),  # Friday
        (at(5, 3), False),
        (at(6, 3), False),
    ],
)
def test_window_on_selected_days_only(now: dt.datetime, expected: bool) -> None:
    assert in_window(TUE_WED_THU, now) is expected


def test_window_crossing_midnight() -> None:
    # Fridays 23:00 for 3 hours: open until Saturday 02:00.
    fri_night = window({4}, "23:00", "3h")
    assert not in_window(fri_night, at(4, 22, 59))
    assert in_window(fri_night, at(4, 23))
    assert in_window(fri_night, at(5, 0, 30))  # Saturday, though Saturday is not selected
    assert in_window(fri_night, at(5, 1, 59))
    assert not in_window(fri_night, at(5, 2))
    # Thursday 00:30 is not the tail of a Wednesday window: Wednesday is not selected.
    assert not in_window(fri_night, at(3, 0, 30))


def test_crossing_midnight_into_the_next_week() -> None:
    sun_night = window({6}, "22:00", "4h")
    assert in_window(sun_night, at(7, 1))  # Monday 01:00 of the next week
    assert not in_window(sun_night, at(7, 2))
    assert next_window_start(sun_night, at(7, 2)) == at(13, 22)


def test_full_day_window() -> None:
    sundays = window({6}, "00:00", "24h")
    assert in_window(sundays, at(6, 0))
    assert in_window(sundays, at(6, 23, 59))
    assert not in_window(sundays, at(7, 0))
    assert not in_window(sundays, at(5, 23, 59))


def test_opening_at_or_before() -> None:
    assert window_opening_at_or_before(TUE_WED_THU, at(1, 3)) == at(1, 2)
    assert window_opening_at_or_before(TUE_WED_THU, at(1, 2)) == at(1, 2)
    assert window_opening_at_or_before(TUE_WED_THU, at(1, 1)) == at(-4, 2)  # last Thursday
    assert window_opening_at_or_before(TUE_WED_THU, at(6, 12)) == at(3, 2)


@pytest.mark.parametrize(
    ("after", "expected"),
    [
        (at(0, 12), at(1, 2)),  # Monday noon -> Tuesday 02:00
        (at(1, 1, 59), at(1, 2)),
        (at(1, 3), at(1, 3)),  # inside a window: now
        (at(1, 5), at(2, 2)),  # just closed -> tomorrow
        (at(3, 5), at(8, 2)),  # Thursday after the window -> next Tuesday
        (at(4, 0), at(8, 2)),
        (at(6, 23, 59), at(8, 2)),
    ],
)
def test_next_window_start(after: dt.datetime, expected: dt.datetime) -> None:
    assert next_window_start(TUE_WED_THU, after) == expected


def test_next_rotation_without_window() -> None:
    last = at(0, 10)
    assert next_rotation(last, dt.timedelta(hours=2160), None) == last + dt.timedelta(days=90)


def test_next_rotation_moves_into_the_window() -> None:
    # Due on a Saturday at 10:00: waits for Tuesday 02:00.
    last = at(5, 10) - dt.timedelta(days=7)
    assert next_rotation(last, dt.timedelta(days=7), TUE_WED_THU) == at(8, 2)


def test_next_rotation_inside_the_window_is_not_moved() -> None:
    last = at(1, 3) - dt.timedelta(days=7)
    assert next_rotation(last, dt.timedelta(days=7), TUE_WED_THU) == at(1, 3)


def test_windows_are_in_utc_whatever_the_offset_of_now() -> None:
    # Tuesday 03:00 UTC is Monday 22:00 in New York (UTC-5): still inside the UTC window.
    new_york = dt.timezone(dt.timedelta(hours=-5))
    now = at(1, 3).astimezone(new_york)
    assert now.weekday() == 0
    assert in_window(TUE_WED_THU, now)
    assert next_window_start(TUE_WED_THU, now) == at(1, 3)
    # Monday 12:00 UTC is Monday 21:00 in Tokyo; the next opening is Tuesday 02:00 UTC.
    tokyo = dt.timezone(dt.timedelta(hours=9))
    later = at(0, 12).astimezone(tokyo)
    assert not in_window(TUE_WED_THU, later)
    assert next_window_start(TUE_WED_THU, later) == at(1, 2)


# -- properties -------------------------------------------------------------------------


@st.composite
def windows(draw: st.DrawFn) -> MaintenanceWindow:
    days = draw(st.frozensets(st.integers(0, 6), min_size=1))
    start = dt.time(draw(st.integers(0, 23)), draw(st.integers(0, 59)))
    length = dt.timedelta(minutes=draw(st.integers(30, 24 * 60)))
    return MaintenanceWindow(days, start, length)


instants = st.integers(0, 60 * 24 * 60).map(lambda m: MON + dt.timedelta(minutes=m))


def _in_window_brute_force(w: MaintenanceWindow, now: dt.datetime) -> bool:
    for back in range(-1, 9):
        day = (now - dt.timedelta(days=back)).date()
        opening = dt.datetime.combine(day, w.start, tzinfo=UTC)
        if day.weekday() in w.days and opening <= now < opening + w.length:
            return True
    return False


@given(windows(), instants)
def test_in_window_matches_brute_force(w: MaintenanceWindow, now: dt.datetime) -> None:
    assert in_window(w, now) == _in_window_brute_force(w, now)


@given(windows(), instants)
def test_next_window_start_is_the_first_open_instant(
    w: MaintenanceWindow, after: dt.datetime
) -> None:
    start = next_window_start(w, after)
    assert start >= after
    assert start - after <= dt.timedelta(days=7)
    assert in_window(w, start)
    if start > after:
        # It is an opening on a selected day, and nothing in between was open.
        assert start.time() == w.start
        assert start.weekday() in w.days
        assert not in_window(w, after)
        assert (
            not in_window(w, start - dt.timedelta(minutes=1))
            or start - dt.timedelta(minutes=1) < after
        )


@given(windows(), instants, st.integers(1, 90 * 24))
def test_next_rotation_is_never_early(
    w: MaintenanceWindow, last: dt.datetime, period_hours: int
) -> None:
    period = dt.timedelta(hours=period_hours)
    due = next_rotation(last, period, w)
    assert due >= last + period
    assert in_window(w, due)
