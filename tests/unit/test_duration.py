"""Go/Kubernetes duration strings, as the CRD schemas accept them."""

from __future__ import annotations

import datetime as dt
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.duration import format_duration, parse_duration
from kustody.domain.errors import InvalidArgument

# The pattern the CRDs use for durations (rotationPeriod, destroyAfter, ...).
CRD_PATTERN = re.compile(r"^([0-9]+([.][0-9]+)?(ns|us|ms|s|m|h))+$")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("720h", dt.timedelta(days=30)),
        ("2160h", dt.timedelta(days=90)),
        ("1h30m", dt.timedelta(hours=1, minutes=30)),
        ("90m", dt.timedelta(hours=1, minutes=30)),
        ("1.5h", dt.timedelta(hours=1, minutes=30)),
        ("0s", dt.timedelta(0)),
        ("0", dt.timedelta(0)),
        ("1h0m1s", dt.timedelta(hours=1, seconds=1)),
        ("500ms", dt.timedelta(milliseconds=500)),
        ("250us", dt.timedelta(microseconds=250)),
        ("2000ns", dt.timedelta(microseconds=2)),
        ("87600h", dt.timedelta(days=3650)),
        # Go accepts units in any order and repeated; so does the CRD pattern.
        ("30m1h", dt.timedelta(hours=1, minutes=30)),
    ],
)
def test_parse(text: str, expected: dt.timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "h",
        "10",  # a bare number other than 0 has no unit
        "1d",  # no days in Go durations
        "1w",
        "-1h",
        "+1h",
        "1 h",
        " 1h",
        "1h ",
        "1H",
        "1.h",
        ".5h",
        "1µs",
        "00",
        "1h" * 17,  # longer than the schemas' maxLength of 32
    ],
)
def test_parse_rejects(text: str) -> None:
    assert CRD_PATTERN.match(text) is None or len(text) > 32
    with pytest.raises(InvalidArgument):
        parse_duration(text)


def test_error_message_is_bounded() -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_duration("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (dt.timedelta(hours=1, minutes=30), "1h30m"),
        (dt.timedelta(days=30), "720h"),
        (dt.timedelta(minutes=90), "1h30m"),
        (dt.timedelta(hours=2, seconds=5), "2h5s"),
        (dt.timedelta(seconds=59), "59s"),
        (dt.timedelta(0), "0s"),
        (dt.timedelta(milliseconds=400), "0s"),
        (dt.timedelta(seconds=-5), "0s"),
    ],
)
def test_format(value: dt.timedelta, expected: str) -> None:
    assert format_duration(value) == expected


@given(st.integers(min_value=0, max_value=87600 * 3600))
def test_format_then_parse_round_trips_whole_seconds(seconds: int) -> None:
    value = dt.timedelta(seconds=seconds)
    text = format_duration(value)
    assert CRD_PATTERN.match(text), text  # what we write is what the CRD accepts
    assert parse_duration(text) == value


@given(
    st.lists(
        st.tuples(st.integers(0, 10_000), st.sampled_from(["h", "m", "s", "ms"])),
        min_size=1,
        max_size=4,
    )
)
def test_parse_is_the_sum_of_its_parts(parts: list[tuple[int, str]]) -> None:
    text = "".join(f"{n}{unit}" for n, unit in parts)
    scale = {"h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
    expected_ms = sum(n * scale[unit] for n, unit in parts)
    if len(text) > 32:
        with pytest.raises(InvalidArgument):
            parse_duration(text)
    else:
        assert parse_duration(text) == dt.timedelta(milliseconds=expected_ms)


@given(st.text(max_size=40))
def test_parse_accepts_exactly_the_crd_pattern(text: str) -> None:
    accepted = text == "0" or (CRD_PATTERN.match(text) is not None and len(text) <= 32)
    try:
        parse_duration(text)
    except InvalidArgument:
        assert not accepted
    else:
        assert accepted
