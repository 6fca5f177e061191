"""In-memory copies of watched objects, kept current by watch events and by our own writes.

A write's response is put in the store at once, so a reconcile that follows it never acts on
the object as it was before the write; a late watch event with an older resourceVersion does
not overwrite it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

Key = tuple[str, str]  # (namespace or "", name)
Obj = Mapping[str, Any]

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def trim(obj: Obj) -> Obj:
    """What a store keeps of an object: all of it but ``metadata.managedFields`` and
    kubectl's last-applied annotation, which no reconciler reads and which are most of a
    small object's size (at 10,000 DataKeys, the difference is tens of MiB)."""
    meta = obj.get("metadata")
    if not isinstance(meta, Mapping):
        return obj
    annotations = meta.get("annotations")
    heavy = "managedFields" in meta or (
        isinstance(annotations, Mapping) and LAST_APPLIED in annotations
    )
    if not heavy:
        return obj
    kept = {k: v for k, v in meta.items() if k != "managedFields"}
    if isinstance(annotations, Mapping) and LAST_APPLIED in annotations:
        kept["annotations"] = {k: v for k, v in annotations.items() if k != LAST_APPLIED}
    return {**obj, "metadata": kept}


def key_of(obj: Obj) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace") or ""), str(meta.get("name") or ""))


def resource_version(obj: Obj) -> int | None:
    """The object's resourceVersion as a number (None when it has none)."""
    return _rv(obj)


def _rv(obj: Obj) -> int | None:
    text = (obj.get("metadata") or {}).get("resourceVersion")
    return int(text) if isinstance(text, str) and text.isdigit() else None


class Store:
    """Objects of one kind, optionally indexed by a derived value (e.g. the KeyRing name)."""

    def __init__(self, index: Callable[[Obj], str | None] | None = None) -> None:
        self._objects: dict[Key, Obj] = {}
        self._index_fn = index
        self._index: dict[str, set[Key]] = defaultdict(set)
        self._indexed_as: dict[Key, str] = {}

    def __len__(self) -> int:
        return len(self._objects)

    def get(self, namespace: str | None, name: str) -> Obj | None:
        return self._objects.get((namespace or "", name))

    def put(self, obj: Obj, *, refresh: bool = False) -> bool:
        """Store ``obj`` unless we already hold it or a newer version; returns whether it did.
        ``refresh``: also replace an entry of the same version (a fuller copy of it)."""
        key = key_of(obj)
        old = self._objects.get(key)
        new_rv, old_rv = _rv(obj), _rv(old) if old is not None else None
        if (
            old_rv is not None
            and new_rv is not None
            and (new_rv < old_rv or (new_rv == old_rv and not refresh))
        ):
            return False
        obj = trim(obj)
        self._objects[key] = obj
        self._reindex(key, obj)
        return True

    def delete(self, namespace: str | None, name: str) -> Obj | None:
        key = (namespace or "", name)
        self._reindex(key, None)
        return self._objects.pop(key, None)

    def values(self) -> Iterator[Obj]:
        return iter(list(self._objects.values()))

    def keys(self) -> list[Key]:
        return list(self._objects)

    def __iter__(self) -> Iterator[Key]:
        return iter(list(self._objects))

    def count(self, value: str) -> int:
        """How many objects the index holds under ``value`` (without listing them)."""
        return len(self._index.get(value, ()))

    def by_index(self, value: str) -> list[Obj]:
        return [self._objects[k] for k in sorted(self._index.get(value, ())) if k in self._objects]

    def _reindex(self, key: Key, obj: Obj | None) -> None:
        if self._index_fn is None:
            return
        old = self._indexed_as.pop(key, None)
        if old is not None:
            self._index[old].discard(key)
            if not self._index[old]:
                del self._index[old]
        value = self._index_fn(obj) if obj is not None else None
        if value is not None:
            self._index[value].add(key)
            self._indexed_as[key] = value
