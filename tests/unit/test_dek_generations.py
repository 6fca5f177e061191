"""DEK generations of a DataKey (domain.keyset): regeneration keeps earlier generations, and
retention removes one only through a staged, visible, cancellable removal."""

from __future__ import annotations

import datetime as dt
import json

from hypothesis import given, settings
from hypothesis import strategies as st
from kustody.domain.keyset import (
    GenerationState,
    Retention,
    add_generation,
    from_status,
    key_id_for,
    parse_keep,
    plan_retention,
    primary,
    to_status,
    wrapped_keyset_document,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
HOUR = dt.timedelta(hours=1)


def _keyset(n: int, uid: str = "uid") -> list:  # type: ignore[type-arg]
    generations: list = []  # type: ignore[type-arg]
    for i in range(n):
        generations = add_generation(
            generations, uid=uid, wrapped=f"kustody:v1:g{i + 1}", version=1, now=T0 + i * HOUR
        )
    return generations


def test_a_status_from_before_generations_is_adopted_as_its_current_generation() -> None:
    legacy = {
        "wrappedKey": "kustody:v1:abc",
        "keyRingVersion": 3,
        "dekGeneration": 2,
        "lastGeneratedAt": "2026-01-01T00:00:00Z",
    }
    (g,) = from_status(legacy, "uid-1")
    assert (g.generation, g.version, g.wrapped, g.state) == (
        2, 3, "kustody:v1:abc", GenerationState.PRIMARY,
    )  # fmt: skip
    assert g.key_id == key_id_for("uid-1", 2)
    assert from_status({}, "uid-1") == []


def test_regeneration_keeps_every_earlier_generation_decrypt_only() -> None:
    generations = _keyset(3)
    assert [g.state for g in generations] == [
        GenerationState.DECRYPT_ONLY, GenerationState.DECRYPT_ONLY, GenerationState.PRIMARY,
    ]  # fmt: skip
    assert primary(generations).generation == 3  # type: ignore[union-attr]
    assert len({g.key_id for g in generations}) == 3
    assert generations[0].superseded_at == T0 + HOUR
    # The status round-trips exactly.
    assert from_status({"generations": to_status(generations)}, "uid") == generations


def test_key_ids_are_stable_and_differ_between_datakeys() -> None:
    assert key_id_for("a", 1) == key_id_for("a", 1)
    assert key_id_for("a", 1) != key_id_for("b", 1)
    assert 0 <= key_id_for("a", 1) < 2**32


def test_the_secret_document_publishes_the_whole_keyset_wrapped() -> None:
    doc = json.loads(wrapped_keyset_document(_keyset(2)))
    assert doc["format"] == "kustody.io/wrapped-keyset/v1"
    assert doc["primaryKeyId"] == key_id_for("uid", 2)
    assert [k["status"] for k in doc["keys"]] == ["DecryptOnly", "Primary"]
    assert all(k["wrappedKey"].startswith("kustody:v1:") for k in doc["keys"])


def test_without_retention_nothing_is_ever_scheduled() -> None:
    generations = _keyset(5)
    after, changes, due = plan_retention(generations, Retention(), frozenset(), T0 + 1000 * HOUR)
    assert after == generations
    assert changes == []
    assert due is None


def test_staged_removal_is_visible_then_happens_on_time() -> None:
    generations = _keyset(3)
    retention = Retention(keep_generations=2, removal_delay=24 * HOUR)
    now = T0 + 3 * HOUR
    after, changes, due = plan_retention(generations, retention, frozenset(), now)
    assert [c.kind for c in changes] == ["RemovalScheduled"]
    assert after[0].state is GenerationState.REMOVAL_SCHEDULED
    assert after[0].remove_at == now + 24 * HOUR
    assert due == now + 24 * HOUR
    # Before removeAt: still there. At removeAt: gone, and only that one.
    again, changes, _ = plan_retention(after, retention, frozenset(), now + 23 * HOUR)
    assert len(again) == 3
    assert changes == []
    gone, changes, _ = plan_retention(after, retention, frozenset(), now + 24 * HOUR)
    assert [c.kind for c in changes] == ["Removed"]
    assert [g.generation for g in gone] == [2, 3]


def test_keep_cancels_a_scheduled_removal() -> None:
    retention = Retention(keep_generations=1, removal_delay=HOUR)
    scheduled, _, _ = plan_retention(_keyset(2), retention, frozenset(), T0 + 2 * HOUR)
    kept, changes, _ = plan_retention(scheduled, retention, frozenset({1}), T0 + 5 * HOUR)
    assert [c.kind for c in changes] == ["RemovalCancelled"]
    assert kept[0].state is GenerationState.DECRYPT_ONLY
    assert kept[0].remove_at is None


def test_keep_for_schedules_only_after_the_generation_was_superseded_that_long() -> None:
    retention = Retention(keep_for=48 * HOUR, removal_delay=HOUR)
    generations = _keyset(2)  # generation 1 superseded at T0 + 1h
    _, changes, due = plan_retention(generations, retention, frozenset(), T0 + 10 * HOUR)
    assert changes == []
    assert due == T0 + 49 * HOUR
    _, changes, _ = plan_retention(generations, retention, frozenset(), T0 + 49 * HOUR)
    assert [c.kind for c in changes] == ["RemovalScheduled"]


def test_parse_keep_ignores_garbage() -> None:
    assert parse_keep("1, 3,x,-2,0") == frozenset({1, 3})
    assert parse_keep(None) == frozenset()


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(1, 8),
    keep=st.none() | st.integers(1, 5),
    keep_for_h=st.none() | st.integers(0, 100),
    delay_h=st.integers(1, 200),
    steps=st.lists(st.integers(0, 300), min_size=1, max_size=6),
    pinned=st.frozensets(st.integers(1, 8)),
)
def test_prop_removal_is_always_staged_and_never_touches_the_primary(
    n: int,
    keep: int | None,
    keep_for_h: int | None,
    delay_h: int,
    steps: list[int],
    pinned: frozenset[int],
) -> None:
    retention = Retention(
        keep_generations=keep,
        keep_for=keep_for_h * HOUR if keep_for_h is not None else None,
        removal_delay=delay_h * HOUR,
    )
    generations = _keyset(n)
    now = T0 + n * HOUR
    scheduled_at: dict[int, dt.datetime] = {}
    for step in sorted(steps):
        now = T0 + (n + step) * HOUR
        generations, changes, _ = plan_retention(generations, retention, pinned, now)
        for change in changes:
            g = change.generation
            assert g.state is not GenerationState.PRIMARY
            if change.kind == "RemovalScheduled":
                scheduled_at[g.generation] = now
            if change.kind == "Removed":
                # Removed only after it was visibly scheduled for the whole delay, never pinned.
                assert g.generation in scheduled_at
                assert now >= scheduled_at[g.generation] + retention.removal_delay
                assert g.generation not in pinned
        assert primary(generations) is not None
        assert primary(generations).generation == n  # type: ignore[union-attr]
        if keep is None and keep_for_h is None:
            assert len(generations) == n


def test_generations_by_state_are_a_metric() -> None:
    from kustody.controller.metrics import OperatorMetrics
    from kustody.controller.store import Store
    from prometheus_client import generate_latest

    datakeys = Store()
    status = {"generations": to_status(_keyset(3))}
    datakeys.put({"metadata": {"name": "a", "namespace": "n", "uid": "u"}, "status": status})
    datakeys.put({"metadata": {"name": "b", "namespace": "n", "uid": "v"},
                  "status": {"wrappedKey": "kustody:v1:x", "keyRingVersion": 1}})  # fmt: skip
    metrics = OperatorMetrics()
    metrics.watch_objects(Store(), datakeys, lambda: T0)
    text = generate_latest(metrics.registry).decode()
    assert 'kustody_dek_generations_in_keysets{state="Primary"} 2.0' in text
    assert 'kustody_dek_generations_in_keysets{state="DecryptOnly"} 2.0' in text
    assert 'kustody_dek_generations_in_keysets{state="RemovalScheduled"} 0.0' in text


def test_the_generations_report_follows_its_schema_and_shows_key_ids_in_hex() -> None:
    import jsonschema
    from kustody.cli import output
    from kustody.cli.datakeys import _table, generations_report

    kept = {"kustody.io/keep-generations": "1"}
    datakey = {
        "metadata": {"name": "a", "namespace": "n", "annotations": kept},
        "status": {"generations": to_status(_keyset(2))},
    }
    report = generations_report(datakey)
    jsonschema.validate(report, output.schema("GenerationsReport"))
    assert report["kept"] == [1]
    assert report["generations"][1]["keyId"] == f"{key_id_for('uid', 2):08x}"
    table = _table(report, wide=True)
    assert table.splitlines()[0].split()[:3] == ["GENERATION", "KEY", "ID"]
    assert "Primary" in table.splitlines()[2]


def test_the_work_queue_depth_is_a_metric() -> None:
    from kustody.controller.metrics import OperatorMetrics
    from prometheus_client import generate_latest

    metrics = OperatorMetrics()
    depth = [3]
    metrics.watch_queue(lambda: depth[0])
    assert "kustody_workqueue_depth 3.0" in generate_latest(metrics.registry).decode()
    depth[0] = 0
    assert "kustody_workqueue_depth 0.0" in generate_latest(metrics.registry).decode()
