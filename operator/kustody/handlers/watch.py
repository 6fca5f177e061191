"""Kopf registrations: watch events fill the stores and queue the affected objects.

The handlers here do no work themselves (no API calls, no HSM calls); they only record the
latest object and decide what must be looked at again. Reconciling happens in workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import kopf

from kustody.domain.secret import LABEL_DATAKEY, MANAGED_BY, MANAGER
from kustody.handlers.runtime import (
    DATAKEY,
    KEYRING,
    POLICY,
    Runtime,
    datakey_keyring,
    keyring_policy,
    matters_to_datakeys,
)
from kustody.handlers.store import Obj, Store, key_of
from kustody.kube.resources import GROUP, VERSION


def _record(store: Store, event: Mapping[str, Any]) -> tuple[Obj | None, Obj, bool]:
    """Apply a watch event to ``store``: (previous object, object, whether anything changed)."""
    obj: Obj = dict(event["object"])
    namespace, name = key_of(obj)
    previous = store.get(namespace, name)
    if event.get("type") == "DELETED":
        store.delete(namespace, name)
        return previous, obj, True
    return previous, obj, store.put(obj)


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    @kopf.on.event(GROUP, VERSION, "keyrings", registry=registry)
    async def keyring_event(event: Mapping[str, Any], **_: Any) -> None:
        old, obj, changed = _record(rt.keyrings, event)
        if not changed:
            return
        name = obj["metadata"]["name"]
        rt.enqueue(KEYRING, None, name)
        if matters_to_datakeys(old, obj) or event.get("type") == "DELETED":
            rt.enqueue_datakeys_of(name)
        if policy := keyring_policy(obj):
            rt.enqueue(POLICY, None, policy, delay=1.0)

    @kopf.on.event(GROUP, VERSION, "datakeys", registry=registry)
    async def datakey_event(event: Mapping[str, Any], **_: Any) -> None:
        _old, obj, changed = _record(rt.datakeys, event)
        if not changed:
            return
        meta = obj["metadata"]
        rt.enqueue(DATAKEY, meta.get("namespace"), meta["name"])
        if keyring := datakey_keyring(obj):
            rt.enqueue(KEYRING, None, keyring, delay=1.0)

    @kopf.on.event(GROUP, VERSION, "rotationpolicies", registry=registry)
    async def policy_event(event: Mapping[str, Any], **_: Any) -> None:
        _old, obj, changed = _record(rt.policies, event)
        if not changed:
            return
        name = obj["metadata"]["name"]
        rt.enqueue(POLICY, None, name)
        for kr in rt.keyrings.by_index(name):
            rt.enqueue(KEYRING, None, kr["metadata"]["name"])

    @kopf.on.event("", "v1", "secrets", registry=registry)
    async def secret_event(event: Mapping[str, Any], **_: Any) -> None:
        labels = (event["object"].get("metadata") or {}).get("labels") or {}
        if labels.get(MANAGED_BY) != MANAGER:  # the server-side selector already ensures it
            return
        _old, obj, changed = _record(rt.secrets, event)
        if changed and (owner := labels.get(LABEL_DATAKEY)):
            rt.enqueue(DATAKEY, obj["metadata"].get("namespace"), owner)

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(event: Mapping[str, Any], **_: Any) -> None:
        old, obj, changed = _record(rt.namespaces, event)
        if changed and _labels(old) != _labels(obj):
            name = obj["metadata"]["name"]
            for dk in rt.datakeys.values():
                if dk["metadata"].get("namespace") == name:
                    rt.enqueue(DATAKEY, name, dk["metadata"]["name"])


def _labels(obj: Obj | None) -> Any:
    return ((obj or {}).get("metadata") or {}).get("labels")


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings for a watch-only use: no peering, no posting, bounded watches."""
    settings.peering.standalone = True  # one active replica is ensured by our Lease
    settings.posting.enabled = False  # Events are ours, deduplicated (kube.events)
    settings.watching.server_timeout = 270  # streams silently die without it (kopf #585)
    settings.watching.client_timeout = 300
    settings.watching.label_selectors["secrets"] = f"{MANAGED_BY}={MANAGER}"
    settings.networking.request_timeout = 60
