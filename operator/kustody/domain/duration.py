"""Go/Kubernetes duration strings ("720h", "1h30m", "0s") as ``timedelta``."""

from __future__ import annotations

import datetime as dt
import re

from kustody.domain.errors import InvalidArgument

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)")
_WHOLE = re.compile(r"(?:[0-9]+(?:\.[0-9]+)?(?:ns|us|ms|s|m|h))+")


def parse_duration(text: str) -> dt.timedelta:
    """Parse a duration as the CRD schemas accept it; "0" alone means zero."""
    if text == "0":
        return dt.timedelta(0)
    if len(text) > 32 or _WHOLE.fullmatch(text) is None:
        raise InvalidArgument(f"{text[:40]!r} is not a duration such as '720h' or '1h30m'")
    seconds = sum(float(n) * _UNIT_SECONDS[unit] for n, unit in _PART.findall(text))
    return dt.timedelta(seconds=seconds)


def format_duration(value: dt.timedelta) -> str:
    """The shortest h/m/s form, e.g. ``timedelta(hours=1, minutes=30)`` → "1h30m"."""
    total = int(value.total_seconds())
    if total <= 0:
        return "0s"
    hours, rest = divmod(total, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [
        f"{hours}h" if hours else "",
        f"{minutes}m" if minutes else "",
        f"{seconds}s" if seconds else "",
    ]
    return "".join(parts)
