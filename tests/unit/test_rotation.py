"""When a KeyRing rotates: on schedule (inside the window) or at once on request."""

from __future__ import annotations

import datetime as dt

from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.rotation import decide
from kustody.domain.schedule import in_window
from kustody.domain.specs import MaintenanceWindow, Rewrap, RotationPolicySpec

UTC = dt.UTC
MON = dt.datetime(2024, 1, 1, tzinfo=UTC)  # a Monday
WEEK = dt.timedelta(days=7)
# Tuesdays 02:00-05:00 UTC.
TUESDAY_NIGHT = MaintenanceWindow(frozenset({1}), dt.time(2, 0), dt.timedelta(hours=3))


def policy(
    period: dt.timedelta = WEEK, window: MaintenanceWindow | None = None
) -> RotationPolicySpec:
    return RotationPolicySpec(
        rotation_period=period,
        retire_after=None,
        destroy_after=dt.timedelta(hours=720),
        rewrap=Rewrap.AUTOMATIC,
        window=window,
    )


def test_not_due_before_the_period() -> None:
    d = decide(MON + WEEK - dt.timedelta(seconds=1), MON, policy(), None, None)
    assert not d.due
    assert d.reason == ""
    assert d.next_at == MON + WEEK


def test_due_at_and_after_the_period() -> None:
    for now in (MON + WEEK, MON + WEEK + dt.timedelta(hours=5)):
        d = decide(now, MON, policy(), None, None)
        assert d.due
        assert d.reason == "Scheduled"
        assert d.next_at == MON + WEEK


def test_without_policy_only_requests_rotate() -> None:
    d = decide(MON + 100 * WEEK, MON, None, None, None)
    assert not d.due
    assert d.next_at is None
    d = decide(MON, MON, None, "2024-01-01T00:00:00Z", None)
    assert d.due
    assert d.reason == "Requested"


def test_request_rotates_once_per_new_value() -> None:
    p = policy()
    first = "2024-01-02T10:00:00Z"
    assert decide(MON + dt.timedelta(days=1), MON, p, first, None).due
    handled = decide(MON + dt.timedelta(days=1), MON, p, first, first)
    assert not handled.due
    second = "2024-01-03T10:00:00Z"
    again = decide(MON + dt.timedelta(days=2), MON, p, second, first)
    assert again.due
    assert again.reason == "Requested"


def test_empty_annotation_is_no_request() -> None:
    assert not decide(MON + dt.timedelta(days=1), MON, policy(), "", None).due


def test_request_is_not_delayed_by_the_window() -> None:
    # Thursday noon: the Tuesday window is closed, the request rotates anyway.
    thursday = MON + dt.timedelta(days=3, hours=12)
    assert not in_window(TUESDAY_NIGHT, thursday)
    d = decide(thursday, MON, policy(window=TUESDAY_NIGHT), "2024-01-04T12:00:00Z", None)
    assert d.due
    assert d.reason == "Requested"


def test_schedule_waits_for_the_window() -> None:
    # Last rotation Monday 00:00, period one week: due Monday 00:00 next week, which is
    # outside the window; the rotation moves to Tuesday 02:00.
    p = policy(window=TUESDAY_NIGHT)
    tuesday_two = MON + WEEK + dt.timedelta(days=1, hours=2)
    early = decide(MON + WEEK + dt.timedelta(hours=12), MON, p, None, None)
    assert not early.due
    assert early.next_at == tuesday_two
    on_time = decide(tuesday_two + dt.timedelta(minutes=10), MON, p, None, None)
    assert on_time.due
    assert on_time.reason == "Scheduled"


def test_overdue_schedule_still_waits_for_the_window() -> None:
    # Due inside one Tuesday window, but the operator was down and comes back on Thursday:
    # scheduled work may only start in a window, so it waits for the next Tuesday.
    p = policy(window=TUESDAY_NIGHT)
    last = MON + dt.timedelta(days=1, hours=3) - WEEK  # due Tuesday 03:00, inside the window
    thursday = MON + dt.timedelta(days=3, hours=12)
    d = decide(thursday, last, p, None, None)
    assert not d.due
    assert d.next_at == MON + WEEK + dt.timedelta(days=1, hours=2)
    assert decide(d.next_at, last, p, None, None).due


windows = st.builds(
    MaintenanceWindow,
    st.frozensets(st.integers(0, 6), min_size=1),
    st.builds(dt.time, st.integers(0, 23), st.integers(0, 59)),
    st.integers(30, 24 * 60).map(lambda m: dt.timedelta(minutes=m)),
)
hours = st.integers(0, 24 * 60).map(lambda h: dt.timedelta(hours=h))


@given(st.none() | windows, hours, st.integers(1, 24 * 30), hours)
def test_scheduled_rotation_properties(
    window: MaintenanceWindow | None,
    last_offset: dt.timedelta,
    period_hours: int,
    elapsed: dt.timedelta,
) -> None:
    last = MON + last_offset
    now = last + elapsed
    p = policy(dt.timedelta(hours=period_hours), window)
    d = decide(now, last, p, None, None)
    assert d.next_at is not None
    # Never before the period is over, never outside the window.
    if d.due:
        assert d.reason == "Scheduled"
        assert now >= last + p.rotation_period
        assert in_window(window, now)
    else:
        assert d.next_at > now
        assert in_window(window, d.next_at)
        assert d.next_at >= last + p.rotation_period
