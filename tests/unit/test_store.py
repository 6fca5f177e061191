"""The object store: newer versions only, and an index that follows changes."""

from __future__ import annotations

from typing import Any

from kustody.controller.store import LAST_APPLIED, Store


def _dk(name: str, rv: str, ring: str | None, ns: str = "app") -> dict[str, Any]:
    spec = {"keyRingRef": {"name": ring}} if ring else {}
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": rv}, "spec": spec}


def _ring(obj: Any) -> str | None:
    return ((obj.get("spec") or {}).get("keyRingRef") or {}).get("name")


def test_an_older_or_equal_version_never_replaces_a_newer_one() -> None:
    store = Store()
    assert store.put(_dk("a", "10", "r"))
    assert not store.put(_dk("a", "9", "r"))  # a late watch event after our own write
    assert not store.put(_dk("a", "10", "r"))  # the echo of our own write
    assert store.put(_dk("a", "11", "r"))
    assert store.get("app", "a")["metadata"]["resourceVersion"] == "11"  # type: ignore[index]


def test_index_follows_changes_and_deletes() -> None:
    store = Store(_ring)
    store.put(_dk("a", "1", "r1"))
    store.put(_dk("b", "1", "r1"))
    store.put(_dk("c", "1", None))
    assert [o["metadata"]["name"] for o in store.by_index("r1")] == ["a", "b"]
    store.put(_dk("a", "2", "r2"))
    assert [o["metadata"]["name"] for o in store.by_index("r1")] == ["b"]
    assert [o["metadata"]["name"] for o in store.by_index("r2")] == ["a"]
    store.delete("app", "b")
    assert store.by_index("r1") == []
    assert store.get("app", "b") is None
    assert sorted(store) == [("app", "a"), ("app", "c")]


def test_the_store_keeps_no_managed_fields_or_last_applied_configuration() -> None:
    store = Store()
    obj = {
        "metadata": {
            "name": "a",
            "namespace": "ns",
            "resourceVersion": "5",
            "managedFields": [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}],
            "annotations": {LAST_APPLIED: "{...}", "kustody.io/rotate": "now"},
        },
        "spec": {"x": 1},
    }
    assert store.put(obj)
    held = store.get("ns", "a")
    assert held is not None
    assert "managedFields" not in held["metadata"]
    assert held["metadata"]["annotations"] == {"kustody.io/rotate": "now"}
    assert held["spec"] == {"x": 1}
    assert "managedFields" in obj["metadata"]  # the caller's object is not changed
