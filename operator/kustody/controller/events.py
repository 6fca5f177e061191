"""Watch events fill the stores and queue the affected objects: one handler per kind, and
the Secret handlers fed by the metadata-only informer (``secret_event``).

The handlers do no work themselves (no API calls, no HSM calls); they only record the latest
object and decide what must be looked at again. Reconciling happens in workers. Kopf delivers
the events (:mod:`kustody.controller.watch`, the only Kopf code); this module does not import
it, so tests feed the same handlers from the in-memory fakes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kustody.controller.runtime import (
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
from kustody.controller.store import Key, Obj, Store, key_of, resource_version
from kustody.domain.secret import LABEL_DATAKEY, LABEL_KEYRING, MANAGED_BY, MANAGER
from kustody.kube.errors import KubeError
from kustody.kube.protocol import KubeApi
from kustody.kube.resources import (
    DATAKEYS,
    ESCROW_AGENTS,
    KEYRINGS,
    NAMESPACES,
    ROTATION_POLICIES,
    Resource,
)

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


def keyring_event(rt: Runtime, event: Mapping[str, Any]) -> None:
    old, obj, changed = _record(rt.keyrings, event)
    if not changed:
        return
    name = obj["metadata"]["name"]
    rt.enqueue(KEYRING, None, name)
    if matters_to_datakeys(old, obj) or event.get("type") == "DELETED":
        rt.enqueue_datakeys_of(name)
    if policy := keyring_policy(obj):
        rt.enqueue(POLICY, None, policy, delay=1.0)


def datakey_event(rt: Runtime, event: Mapping[str, Any]) -> None:
    _old, obj, changed = _record(rt.datakeys, event)
    if not changed:
        return
    meta = obj["metadata"]
    rt.enqueue(DATAKEY, meta.get("namespace"), meta["name"])
    if keyring := datakey_keyring(obj):
        # Its references and Rotating condition: a KeyRing pass looks at all its DataKeys,
        # so while thousands change it looks at most every few seconds (1 s up to 2,000).
        rt.enqueue(KEYRING, None, keyring, delay=rt.keyring_delay(keyring))


def policy_event(rt: Runtime, event: Mapping[str, Any]) -> None:
    _old, obj, changed = _record(rt.policies, event)
    if not changed:
        return
    name = obj["metadata"]["name"]
    rt.enqueue(POLICY, None, name)
    for kr in rt.keyrings.by_index(name):
        rt.enqueue(KEYRING, None, kr["metadata"]["name"])


def namespace_event(rt: Runtime, event: Mapping[str, Any]) -> None:
    old, obj, changed = _record(rt.namespaces, event)
    if changed and _labels(old) != _labels(obj):
        name = obj["metadata"]["name"]
        for dk in rt.datakeys.values():
            if dk["metadata"].get("namespace") == name:
                rt.enqueue(DATAKEY, name, dk["metadata"]["name"])
        # Which namespaces a selector allows decides which references count.
        for ring in rt.keyrings:
            rt.enqueue(KEYRING, None, ring[1], delay=1.0)


def escrow_agent_event(rt: Runtime, event: Mapping[str, Any]) -> None:
    _old, obj, changed = _record(rt.escrow_agents, event)
    if not changed:
        return
    name = obj["metadata"]["name"]
    rt.enqueue(ESCROW_AGENT, None, name)
    # KeyRings that name the agent look again (its admission or jurisdiction changed).
    for kr in rt.keyrings.values():
        if name in ((kr.get("spec") or {}).get("escrow") or {}).get("agents", ()):
            rt.enqueue(KEYRING, None, kr["metadata"]["name"], delay=1.0)


Handler = Callable[[Runtime, Mapping[str, Any]], None]


def stores(rt: Runtime) -> list[tuple[Store, Resource, Handler]]:
    """Each watched kind but Secrets: its store, its resource and its event handler."""
    return [
        (rt.keyrings, KEYRINGS, keyring_event),
        (rt.datakeys, DATAKEYS, datakey_event),
        (rt.policies, ROTATION_POLICIES, policy_event),
        (rt.namespaces, NAMESPACES, namespace_event),
        (rt.escrow_agents, ESCROW_AGENTS, escrow_agent_event),
    ]


def kopf_stores(rt: Runtime) -> list[tuple[Store, Resource, Handler]]:
    """The kinds Kopf watches: all but DataKeys (their own informer, the kind there are most
    of; see :func:`datakeys_relisted`) and Secrets (metadata only, :func:`secret_event`)."""
    return [entry for entry in stores(rt) if entry[1] is not DATAKEYS]


def datakey_watched(rt: Runtime, kind: str, obj: Obj) -> None:
    """A DataKey event from its informer."""
    datakey_event(rt, {"type": kind, "object": obj})


def datakeys_relisted(rt: Runtime, datakeys: Sequence[Obj], list_version: str) -> None:
    """After a (re)list of DataKeys: forget the held ones the LIST no longer shows (unless
    newer than it), take in the rest."""
    present = {key_of(d) for d in datakeys}
    listed = int(list_version) if list_version.isdigit() else 0
    if gone := forget_vanished(rt, rt.datakeys, datakey_event, present, listed):
        log.info("%d DataKey(s) deleted while the watch was broken: forgotten", gone)
    for obj in datakeys:
        datakey_event(rt, {"type": "MODIFIED", "object": obj})


def forget_vanished(
    rt: Runtime, store: Store, handler: Handler, present: set[Key], list_version: int
) -> int:
    """Deliver DELETED for held objects a LIST no longer shows. Kopf relists after its watch
    broke (410 Gone, an API-server restart) but reports only the objects that exist, never
    those deleted meanwhile; without this the operator would count them for ever. Objects
    newer than the LIST are kept (they may have been created after it). Returns the count."""
    gone = 0
    for key in store:
        obj = store.get(*key)
        if obj is None or key in present:
            continue
        version = resource_version(obj)
        if version is not None and version > list_version:
            continue
        handler(rt, {"type": "DELETED", "object": obj})
        gone += 1
    return gone


async def prune(rt: Runtime, kube: KubeApi) -> None:
    """LIST each watched kind (metadata only) and forget what is gone."""
    for store, res, handler in stores(rt):
        try:
            items, version = await kube.list_metadata(res)
        except KubeError as exc:
            log.warning("could not list %s to prune the cache: %s", res.kind, exc)
            continue
        present = {key_of(i) for i in items}
        listed = int(version) if version.isdigit() else 0
        if gone := forget_vanished(rt, store, handler, present, listed):
            log.info("%d %s(s) deleted while a watch was broken: forgotten", gone, res.kind)


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
