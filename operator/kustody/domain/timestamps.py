"""RFC 3339 timestamps as Kubernetes writes them (UTC, second precision, "Z")."""

from __future__ import annotations

import datetime as dt


def format_time(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_micro_time(value: dt.datetime) -> str:
    """RFC 3339 with microseconds (Lease renewTime, request annotations)."""
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str | None) -> dt.datetime | None:
    """Parse an RFC 3339 timestamp; None (never an exception) for missing or garbled input."""
    if not text:
        return None
    try:
        value = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=dt.UTC)
