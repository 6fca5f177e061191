"""Which Secrets the operator holds and counts: only a DataKey's own (issue: forged labels)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any, cast

import pytest
from kustody.controller import events
from kustody.controller.keyring.references import references
from kustody.controller.metrics import OperatorMetrics
from kustody.controller.runtime import DATAKEY, MAX_CACHED_SECRET_DATA, Runtime, trim_secret
from kustody.controller.store import Store
from kustody.domain.specs import NamespaceSelector
from kustody.kube.informer import read_watch_lines
from kustody.kube.workloads import opted_in

LABELS = {"app.kubernetes.io/managed-by": "kustody", "kustody.io/keyring": "ring"}


def _runtime() -> Runtime:
    return Runtime(kube=cast(Any, None), hsm=cast(Any, None), events=cast(Any, None),
                   metrics=OperatorMetrics())  # fmt: skip


def _datakey(name: str, ns: str = "app", uid: str = "uid-1", version: int = 2) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "namespace": ns, "uid": uid, "resourceVersion": "5"},
        "spec": {"keyRingRef": {"name": "ring"}, "secretName": f"{name}-dek"},
        "status": {"keyRingVersion": version, "secretRef": {"name": f"{name}-dek"}},
    }


def _secret(
    name: str,
    ns: str = "app",
    *,
    version: int = 1,
    owner: tuple[str, str] | None = None,
    rv: str = "7",
    data: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": ns,
        "resourceVersion": rv,
        "labels": {**LABELS, "kustody.io/keyring-version": str(version)},
    }
    if owner is not None:
        meta["ownerReferences"] = [
            {"apiVersion": "kustody.io/v1alpha1", "kind": "DataKey", "name": owner[0],
             "uid": owner[1], "controller": True},
        ]  # fmt: skip
    secret: dict[str, Any] = {"metadata": meta}
    if data is not None:
        secret["data"] = data
    return secret


def _refs(rt: Runtime, allowed: NamespaceSelector) -> Any:
    return asyncio.run(references(rt, "ring", allowed, fresh=False))


def test_only_a_datakeys_own_secret_is_held_and_counted() -> None:
    rt = _runtime()
    rt.datakeys.put(_datakey("real"))
    rt.datakeys.put(_datakey("other", uid="uid-2"))
    forged = [
        _secret("loose", version=1),  # labels only
        _secret("stolen-owner", version=1, owner=("real", "uid-1")),  # not named by status
        _secret("wrong-uid", version=1, owner=("other", "uid-9")),
        _secret("real-dek", ns="tenant", version=1, owner=("real", "uid-1")),  # other ns
    ]
    for s in forged:
        events.secret_event(rt, "ADDED", s)
    assert len(rt.secrets) == 0
    assert len(rt.queue) == 0

    events.secret_event(rt, "ADDED", _secret("real-dek", version=1, owner=("real", "uid-1")))
    assert rt.secrets.keys() == [("app", "real-dek")]
    refs = _refs(rt, NamespaceSelector(names=frozenset({"app"})))
    # "real": status v2, its Secret still v1 (a re-wrap in flight), so both; "other": v2.
    assert refs.data_keys == {1: 1, 2: 2}
    assert refs.secrets == {1: 1}


def test_a_namespace_the_keyring_no_longer_allows_references_nothing() -> None:
    rt = _runtime()
    rt.datakeys.put(_datakey("real"))
    events.secret_event(rt, "ADDED", _secret("real-dek", version=1, owner=("real", "uid-1")))
    refs = _refs(rt, NamespaceSelector(names=frozenset({"elsewhere"})))
    assert refs.data_keys == {}
    assert refs.secrets == {}


def test_secret_events_queue_only_the_owning_datakey() -> None:
    rt = _runtime()
    rt.datakeys.put(_datakey("real"))
    for i in range(20):
        events.secret_event(rt, "ADDED", _secret(f"junk-{i}", owner=("real", "uid-1")))
    assert len(rt.queue) == 0
    events.secret_event(rt, "ADDED", _secret("real-dek", owner=("real", "uid-1")))
    # The owning DataKey now, its KeyRing a moment later (the Secret's version is a reference).
    assert len(rt.queue) == 2
    assert asyncio.run(rt.queue.get()) == (DATAKEY, "app", "real")
    events.secret_event(rt, "DELETED", _secret("real-dek", owner=("real", "uid-1")))
    assert rt.secrets.keys() == []
    assert asyncio.run(rt.queue.get()) == ("KeyRing", "", "ring")


def test_relist_forgets_secrets_that_disappeared() -> None:
    rt = _runtime()
    rt.datakeys.put(_datakey("a", uid="u-a"))
    rt.datakeys.put(_datakey("b", uid="u-b"))
    events.secret_event(rt, "ADDED", _secret("a-dek", owner=("a", "u-a")))
    events.secret_event(rt, "ADDED", _secret("b-dek", owner=("b", "u-b")))
    events.secrets_relisted(rt, [_secret("b-dek", owner=("b", "u-b"))])
    assert rt.secrets.keys() == [("app", "b-dek")]


def test_trimmed_secrets_keep_small_data_only() -> None:
    small = trim_secret(_secret("s", owner=("a", "u"), data={"wrapped-key": "eA=="}))
    assert small["data"] == {"wrapped-key": "eA=="}
    big = trim_secret(_secret("s", data={"blob": "A" * (MAX_CACHED_SECRET_DATA + 1)}))
    assert "data" not in big
    assert set(big["metadata"]) <= {
        "name", "namespace", "uid", "resourceVersion", "labels", "annotations", "ownerReferences",
    }  # fmt: skip


def test_a_fuller_copy_of_the_same_version_replaces_a_metadata_only_entry() -> None:
    store = Store()
    assert store.put(_secret("s", rv="3"))
    assert not store.put(_secret("s", rv="3", data={"k": "v"}))
    assert store.put(_secret("s", rv="3", data={"k": "v"}), refresh=True)
    assert store.get("app", "s")["data"] == {"k": "v"}  # type: ignore[index]
    assert not store.put(_secret("s", rv="2", data={}), refresh=True)


class _Chunks:
    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = chunks

    def stream(self, _amt: int, decode_content: bool = True) -> Any:
        return iter(self._chunks)


def test_watch_lines_are_split_across_chunks() -> None:
    body = b'{"type":"ADDED","object":{"a":1}}\n{"type":"DELETED","object":{"b":2}}\n'
    chunks = [body[i : i + 7] for i in range(0, len(body), 7)]
    events = list(read_watch_lines(_Chunks(chunks), threading.Event()))
    assert [e["type"] for e in events] == ["ADDED", "DELETED"]


@pytest.mark.parametrize(
    ("annotation", "expected"),
    [(None, False), ("", False), ("other", False), ("regen", True), ("a, regen ,b", True),
     ("regenerate", False)],
)  # fmt: skip
def test_a_workload_is_restarted_only_if_it_names_the_datakey(
    annotation: str | None, expected: bool
) -> None:
    annotations = {} if annotation is None else {"kustody.io/allow-rollout-restart": annotation}
    assert opted_in({"metadata": {"annotations": annotations}}, "regen") is expected


def test_objects_a_list_no_longer_shows_are_forgotten_unless_newer() -> None:
    """Kopf's relist after a broken watch reports no deletions: the operator prunes."""
    rt = _runtime()
    for name, rv in (("gone", "5"), ("kept", "6"), ("new", "20")):
        dk = _datakey(name, uid=f"u-{name}")
        dk["metadata"]["resourceVersion"] = rv
        rt.datakeys.put(dk)
    present = {("app", "kept")}
    gone = events.forget_vanished(rt, rt.datakeys, events.datakey_event, present, list_version=10)
    assert gone == 1
    assert sorted(k[1] for k in rt.datakeys) == ["kept", "new"]  # "new" is after the LIST
    assert len(rt.queue) == 2  # the DataKey (to forget) and its KeyRing (its references)
