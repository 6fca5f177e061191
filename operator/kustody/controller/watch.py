"""Watch events fill the stores and queue the affected objects (Kopf for the custom
resources and Namespaces; a metadata-only informer for Secrets, see ``secret_event``).

The handlers here do no work themselves (no API calls, no HSM calls); they only record the
latest object and decide what must be looked at again. Reconciling happens in workers.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any

import kopf

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
        rt.enqueue(KEYRING, None, keyring, delay=1.0)


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
    """Each Kopf-watched kind: its store, its resource and its event handler."""
    return [
        (rt.keyrings, KEYRINGS, keyring_event),
        (rt.datakeys, DATAKEYS, datakey_event),
        (rt.policies, ROTATION_POLICIES, policy_event),
        (rt.namespaces, NAMESPACES, namespace_event),
        (rt.escrow_agents, ESCROW_AGENTS, escrow_agent_event),
    ]


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


def _registry(rt: Runtime, kubeconfig: str | None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> Any:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return kopf.login_with_service_account(**kwargs)
        return kopf.login_with_kubeconfig(**kwargs)

    register(registry, rt)
    return registry


def quiet_teardown(stop: asyncio.Event) -> None:
    """Once we are stopping, Kopf's watch generators may raise while asyncio finalises them
    (a cancelled stream mid-iteration): harmless at exit, so logged at DEBUG. Anything else,
    or anything before the stop, still goes to the default handler."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        agen = context.get("asyncgen")
        module = getattr(getattr(agen, "ag_code", None), "co_filename", "")
        if stop.is_set() and agen is not None and "/kopf/" in module:
            log.debug("Kopf stream finalised at exit: %s", context.get("message"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def serve(rt: Runtime, kubeconfig: str | None, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
    """Kopf's watches of the custom resources and Namespaces, until ``stop`` is set."""
    return kopf.operator(
        registry=_registry(rt, kubeconfig),
        clusterwide=True,
        standalone=True,
        stop_flag=stop,
    )


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    for _store, res, handler in stores(rt):
        on_event = kopf.on.event(
            res.group, res.version, res.plural, id=f"record-{res.plural}", registry=registry
        )
        on_event(_bound(rt, handler))


def _bound(rt: Runtime, handler: Handler) -> Callable[..., Awaitable[None]]:
    async def on_event(event: Mapping[str, Any], **_: Any) -> None:
        handler(rt, event)

    return on_event


async def prune(rt: Runtime, kube: KubeApi) -> None:
    """LIST each Kopf-watched kind (metadata only) and forget what is gone."""
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


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings for a watch-only use: no peering, no posting, bounded watches."""
    settings.peering.standalone = True  # one active replica is ensured by our Lease
    settings.posting.enabled = False  # Events are ours, deduplicated (kube.events)
    settings.watching.server_timeout = 270  # streams silently die without it (kopf #585)
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
