"""What the API allows, read on the unwrap path and cached for a few seconds:

* a DataKey's KeyRing and ``spec.consumers`` (a consumer removed or a DataKey deleted is
  refused within ``ttl``);
* a KeyRing's ``spec.allowedNamespaces`` and, when it uses a label selector, the caller's
  Namespace labels (a namespace removed from a KeyRing, or relabelled out of its selector,
  is refused within ``ttl`` — revocation reaches the keys already issued there).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from kustody.domain.specs import NamespaceSelector
from kustody.sidecar.unwrap.lookup import CachedLookup

# (namespace, name) -> the DataKey object, or None when it does not exist
Fetch = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]
# name -> the cluster-scoped object (KeyRing, Namespace), or None when it does not exist
FetchCluster = Callable[[str], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True)
class DataKeyGrant:
    key_ring: str
    consumers: frozenset[str]


def grant_from(obj: Mapping[str, Any]) -> DataKeyGrant:
    spec = obj.get("spec") or {}
    ring = str((spec.get("keyRingRef") or {}).get("name") or "")
    consumers = spec.get("consumers") or []
    return DataKeyGrant(ring, frozenset(str(c) for c in consumers))


def selector_from(obj: Mapping[str, Any]) -> NamespaceSelector:
    """A KeyRing's ``spec.allowedNamespaces``; anything unparsable allows nobody."""
    raw = (obj.get("spec") or {}).get("allowedNamespaces")
    if not isinstance(raw, Mapping):
        return NamespaceSelector()
    try:
        return NamespaceSelector.parse(raw)
    except (KeyError, TypeError, ValueError, AttributeError):
        return NamespaceSelector()  # (the CRD's schema keeps this from happening)


def labels_from(obj: Mapping[str, Any]) -> dict[str, str]:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return {str(k): str(v) for k, v in labels.items()} if isinstance(labels, Mapping) else {}


class DataKeyDirectory:
    """``grant(namespace, name)``: the DataKey's grant or None (deleted/never existed).
    Found DataKeys are cached ``ttl`` seconds, missing ones ``negative_ttl``; concurrent
    lookups of one DataKey share one GET."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl: float = 5.0,
        negative_ttl: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        async def load(key: tuple[str, str]) -> DataKeyGrant | None:
            obj = await fetch(*key)
            return None if obj is None else grant_from(obj)

        self._lookup: CachedLookup[tuple[str, str], DataKeyGrant] = CachedLookup(
            load, ttl=ttl, negative_ttl=negative_ttl, max_entries=max_entries, clock=clock
        )
        self.ttl = ttl
        self.negative_ttl = negative_ttl

    async def grant(self, namespace: str, name: str) -> DataKeyGrant | None:
        return await self._lookup.get((namespace, name))


class NamespaceAccess:
    """``allowed(key_ring, namespace)``: does the KeyRing (still) allow the namespace?

    None when the KeyRing does not exist. The KeyRing is cached ``ttl`` seconds (missing
    ``negative_ttl``); the Namespace's labels are read (and cached alike) only when the
    KeyRing selects namespaces by label and does not list this one by name. A Namespace
    that does not exist has no labels.
    """

    def __init__(
        self,
        keyring: FetchCluster,
        namespace: FetchCluster,
        *,
        ttl: float = 5.0,
        negative_ttl: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        async def load_ring(name: str) -> NamespaceSelector | None:
            obj = await keyring(name)
            return None if obj is None else selector_from(obj)

        async def load_labels(name: str) -> dict[str, str] | None:
            obj = await namespace(name)
            return None if obj is None else labels_from(obj)

        options: dict[str, Any] = {
            "ttl": ttl,
            "negative_ttl": negative_ttl,
            "max_entries": max_entries,
            "clock": clock,
        }
        self.keyrings: CachedLookup[str, NamespaceSelector] = CachedLookup(load_ring, **options)
        self.namespaces: CachedLookup[str, dict[str, str]] = CachedLookup(load_labels, **options)

    async def allowed(self, key_ring: str, namespace: str) -> bool | None:
        selector = await self.keyrings.get(key_ring)
        if selector is None:
            return None
        if namespace in selector.names:
            return True
        if not selector.needs_labels:
            return False
        labels = await self.namespaces.get(namespace)
        return selector.allows(namespace, labels)
