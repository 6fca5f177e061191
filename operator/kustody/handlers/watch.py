"""Watch events fill the stores and queue the affected objects (Kopf for the custom
resources and Namespaces; a metadata-only informer for Secrets, see ``secret_event``).

The handlers here do no work themselves (no API calls, no HSM calls); they only record the
latest object and decide what must be looked at again. Reconciling happens in workers.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import kopf

from kustody.domain.secret import LABEL_DATAKEY, LABEL_KEYRING, MANAGED_BY, MANAGER
from kustody.handlers.runtime import (
    DATAKEY,
    ESCROW_AGENT,
    KEYRING,
    POLICY,
    Runtime,
    controller_ref,
    datakey_keyring,
    keyring_policy,
    matters_to_datakeys,
)
from kustody.handlers.store import Obj, Store, key_of
from kustody.kube.resources import GROUP, VERSION

log = logging.getLogger(__name__)


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

    @kopf.on.event(GROUP, VERSION, "escrowagents", registry=registry)
    async def escrow_agent_event(event: Mapping[str, Any], **_: Any) -> None:
        _old, obj, changed = _record(rt.escrow_agents, event)
        if not changed:
            return
        name = obj["metadata"]["name"]
        rt.enqueue(ESCROW_AGENT, None, name)
        for kr in rt.keyrings.values():
            if name in ((kr.get("spec") or {}).get("escrow") or {}).get("agents", ()):
                rt.enqueue(KEYRING, None, kr["metadata"]["name"], delay=1.0)

    @kopf.on.event("", "v1", "namespaces", registry=registry)
    async def namespace_event(event: Mapping[str, Any], **_: Any) -> None:
        old, obj, changed = _record(rt.namespaces, event)
        if changed and _labels(old) != _labels(obj):
            name = obj["metadata"]["name"]
            for dk in rt.datakeys.values():
                if dk["metadata"].get("namespace") == name:
                    rt.enqueue(DATAKEY, name, dk["metadata"]["name"])
            # Which namespaces a selector allows decides which references count.
            for ring in rt.keyrings:
                rt.enqueue(KEYRING, None, ring[1], delay=1.0)


def secret_event(rt: Runtime, kind: str, secret: Obj) -> None:
    """A metadata-only Secret event (kube.informer): keep DataKeys' own Secrets current and
    look again at the DataKey whose Secret changed. Other Secrets, whatever labels they
    carry, cause no work."""
    meta = secret.get("metadata") or {}
    namespace, name = meta.get("namespace"), str(meta.get("name") or "")
    held = rt.secrets.get(namespace, name)
    if kind == "DELETED":
        if held is None:
            return
        rt.secrets.delete(namespace, name)
        changed = True
    else:
        changed = rt.admit_secret(secret)
    if not changed:
        if held is None and (meta.get("labels") or {}).get(MANAGED_BY) == MANAGER:
            log.debug("ignoring Secret %s/%s: not a DataKey's own Secret", namespace, name)
        return
    owner = controller_ref(held or secret)
    dk_name = owner[0] if owner else (meta.get("labels") or {}).get(LABEL_DATAKEY)
    if dk_name:
        rt.enqueue(DATAKEY, namespace, str(dk_name))
    # The version a DataKey's own Secret is labelled with is a reference: a re-wrap finishes
    # when the Secret carries the new version, so its KeyRing looks again then.
    if ring := (meta.get("labels") or {}).get(LABEL_KEYRING):
        rt.enqueue(KEYRING, None, str(ring), delay=1.0)


def secrets_relisted(rt: Runtime, secrets: Sequence[Obj]) -> None:
    """After a (re)list: forget held Secrets that are gone, take in the rest."""
    present = {key_of(s) for s in secrets}
    for namespace, name in rt.secrets:
        if (namespace, name) not in present:
            secret_event(rt, "DELETED", {"metadata": {"namespace": namespace, "name": name}})
    for secret in secrets:
        secret_event(rt, "MODIFIED", secret)


def _labels(obj: Obj | None) -> Any:
    return ((obj or {}).get("metadata") or {}).get("labels")


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings for a watch-only use: no peering, no posting, bounded watches."""
    settings.peering.standalone = True  # one active replica is ensured by our Lease
    settings.posting.enabled = False  # Events are ours, deduplicated (kube.events)
    settings.watching.server_timeout = 270  # streams silently die without it (kopf #585)
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
