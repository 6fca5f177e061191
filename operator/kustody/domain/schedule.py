"""When scheduled work is due: rotation times and maintenance windows."""

from __future__ import annotations

import datetime as dt

from kustody.domain.specs import MaintenanceWindow


def in_window(window: MaintenanceWindow | None, now: dt.datetime) -> bool:
    """Whether ``now`` falls inside an open window (always true without a window)."""
    if window is None:
        return True
    opening = window_opening_at_or_before(window, now)
    return opening is not None and now < opening + window.length


def window_opening_at_or_before(window: MaintenanceWindow, now: dt.datetime) -> dt.datetime | None:
    """The latest window opening at or before ``now`` (looking back eight days)."""
    now = now.astimezone(dt.UTC)  # windows are in UTC: take the UTC date, not the local one
    for back in range(8):
        day = (now - dt.timedelta(days=back)).date()
        opening = dt.datetime.combine(day, window.start, tzinfo=dt.UTC)
        if opening <= now and day.weekday() in window.days:
            return opening
    return None


def next_window_start(window: MaintenanceWindow | None, after: dt.datetime) -> dt.datetime:
    """``after`` itself if a window is open then, else the next opening."""
    if window is None or in_window(window, after):
        return after
    after = after.astimezone(dt.UTC)
    for ahead in range(8):
        day = (after + dt.timedelta(days=ahead)).date()
        opening = dt.datetime.combine(day, window.start, tzinfo=dt.UTC)
        if opening > after and day.weekday() in window.days:
            return opening
    return after  # no days selected: treat as always open rather than never


def next_rotation(
    last_rotation: dt.datetime, period: dt.timedelta, window: MaintenanceWindow | None
) -> dt.datetime:
    """lastRotationAt + rotationPeriod, moved to the next maintenance window if needed."""
    return next_window_start(window, last_rotation + period)
