"""RFC 3339 timestamps as Kubernetes writes them."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.timestamps import format_time, parse_time

UTC = dt.UTC


def test_format_is_utc_with_z_and_second_precision() -> None:
    value = dt.datetime(2024, 2, 29, 23, 59, 58, 999_999, tzinfo=UTC)
    assert format_time(value) == "2024-02-29T23:59:58Z"


def test_format_converts_other_offsets_to_utc() -> None:
    plus_two = dt.timezone(dt.timedelta(hours=2))
    value = dt.datetime(2024, 1, 1, 1, 30, tzinfo=plus_two)
    assert format_time(value) == "2023-12-31T23:30:00Z"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-01T00:00:00Z", dt.datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-06-30T12:34:56+00:00", dt.datetime(2024, 6, 30, 12, 34, 56, tzinfo=UTC)),
        ("2024-01-01T02:00:00+02:00", dt.datetime(2024, 1, 1, tzinfo=UTC)),
        ("2024-01-01T00:00:00.123456Z", dt.datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
        # No offset: Kubernetes times are UTC.
        ("2024-01-01T05:00:00", dt.datetime(2024, 1, 1, 5, tzinfo=UTC)),
    ],
)
def test_parse(text: str, expected: dt.datetime) -> None:
    parsed = parse_time(text)
    assert parsed is not None
    assert parsed.tzinfo is not None
    assert parsed == expected


@pytest.mark.parametrize(
    "text", [None, "", "yesterday", "2024-13-01T00:00:00Z", "2024-01-01T25:00:00Z", "Z", "12"]
)
def test_parse_returns_none_for_missing_or_garbled(text: str | None) -> None:
    assert parse_time(text) is None


@given(st.text(max_size=40))
def test_parse_never_raises(text: str) -> None:
    parsed = parse_time(text)
    assert parsed is None or parsed.tzinfo is not None


@given(
    st.datetimes(
        min_value=dt.datetime(1970, 1, 1),
        max_value=dt.datetime(2200, 1, 1),
        timezones=st.just(UTC),
    )
)
def test_round_trip_truncates_to_the_second(value: dt.datetime) -> None:
    parsed = parse_time(format_time(value))
    assert parsed == value.replace(microsecond=0)
    assert format_time(parsed) == format_time(value)
