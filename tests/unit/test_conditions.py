"""Status conditions: a list keyed by type, lastTransitionTime only moves with status."""

from __future__ import annotations

import datetime as dt
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.conditions import Condition, find, is_true, merge
from kustody.domain.timestamps import format_time

T0 = dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)
T2 = T0 + dt.timedelta(hours=1)


def ready(status: bool | None, reason: str = "Ready", message: str = "ok") -> Condition:
    return Condition("Ready", status, reason, message)


def test_status_text() -> None:
    assert ready(True).status_text == "True"
    assert ready(False).status_text == "False"
    assert ready(None).status_text == "Unknown"


def test_new_condition_has_every_required_field() -> None:
    [cond] = merge([], [ready(True, "KeyCreated", "created v1")], generation=3, now=T0)
    assert cond == {
        "type": "Ready",
        "status": "True",
        "observedGeneration": 3,
        "lastTransitionTime": format_time(T0),
        "reason": "KeyCreated",
        "message": "created v1",
    }


def test_same_status_keeps_transition_time_but_updates_the_rest() -> None:
    first = merge([], [ready(False, "Pending", "waiting")], generation=1, now=T0)
    second = merge(first, [ready(False, "HSMUnreachable", "no socket")], generation=2, now=T1)
    [cond] = second
    assert cond["lastTransitionTime"] == format_time(T0)
    assert cond["reason"] == "HSMUnreachable"
    assert cond["message"] == "no socket"
    assert cond["observedGeneration"] == 2


def test_status_change_moves_transition_time() -> None:
    first = merge([], [ready(False)], generation=1, now=T0)
    second = merge(first, [ready(True)], generation=1, now=T1)
    third = merge(second, [ready(None)], generation=1, now=T2)
    assert find(second, "Ready")["lastTransitionTime"] == format_time(T1)  # type: ignore[index]
    assert find(third, "Ready")["lastTransitionTime"] == format_time(T2)  # type: ignore[index]
    assert find(third, "Ready")["status"] == "Unknown"  # type: ignore[index]


def test_other_conditions_are_kept_untouched() -> None:
    existing: list[dict[str, Any]] = [
        {
            "type": "HSMReachable",
            "status": "True",
            "observedGeneration": 1,
            "lastTransitionTime": "2023-01-01T00:00:00Z",
            "reason": "Connected",
            "message": "",
        }
    ]
    merged = merge(existing, [ready(True)], generation=5, now=T0)
    assert [c["type"] for c in merged] == ["HSMReachable", "Ready"]
    assert find(merged, "HSMReachable") == existing[0]
    assert find(merged, "Ready")["observedGeneration"] == 5  # type: ignore[index]


def test_merge_does_not_mutate_its_input() -> None:
    existing = merge([], [ready(False)], generation=1, now=T0)
    snapshot = [dict(c) for c in existing]
    merge(existing, [ready(True)], generation=2, now=T1)
    assert existing == snapshot


def test_one_entry_per_type_sorted() -> None:
    merged = merge(
        [],
        [
            Condition("Rotating", False, "Idle", ""),
            ready(True),
            Condition("Rotating", True, "R", ""),
        ],
        generation=1,
        now=T0,
    )
    assert [c["type"] for c in merged] == ["Ready", "Rotating"]
    assert find(merged, "Rotating")["status"] == "True"  # type: ignore[index]


def test_message_is_bounded() -> None:
    [cond] = merge([], [ready(False, "Failed", "x" * 5000)], generation=1, now=T0)
    assert 0 < len(cond["message"]) <= 32768


def test_existing_condition_without_transition_time_gets_one() -> None:
    # A status written by hand or by an older version: lastTransitionTime is required by the
    # schema, so it must never be written back as null.
    existing = [{"type": "Ready", "status": "True", "reason": "Ok", "message": ""}]
    [cond] = merge(existing, [ready(True)], generation=1, now=T1)
    assert cond["lastTransitionTime"] == format_time(T1)


def test_find_and_is_true() -> None:
    merged = merge([], [ready(True), Condition("Rotating", False, "Idle", "")], 1, T0)
    assert is_true(merged, "Ready")
    assert not is_true(merged, "Rotating")
    assert not is_true(merged, "Missing")
    assert find(merged, "Missing") is None
    unknown = merge([], [ready(None)], 1, T0)
    assert not is_true(unknown, "Ready")


statuses = st.sampled_from([True, False, None])


@given(st.lists(statuses, min_size=1, max_size=12))
def test_transition_time_is_the_time_of_the_last_status_change(
    sequence: list[bool | None],
) -> None:
    conditions: list[dict[str, Any]] = []
    last_change = None
    previous: bool | str | None = "none yet"
    for i, status in enumerate(sequence):
        now = T0 + dt.timedelta(minutes=i)
        conditions = merge(conditions, [ready(status, f"R{i}")], generation=i + 1, now=now)
        if status != previous:
            last_change = now
        previous = status
        cond = find(conditions, "Ready")
        assert cond is not None
        assert cond["lastTransitionTime"] == format_time(last_change)  # type: ignore[arg-type]
        assert cond["observedGeneration"] == i + 1
        assert cond["reason"] == f"R{i}"
        assert len(conditions) == 1
