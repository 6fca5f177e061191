"""The DataKey's Secret: read (from the cache or one GET), rendered from the status, written
and checked against what the API server stored; plaintext withdrawn on revocation."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kustody.controller.datakey.state import DataKeyPass
from kustody.controller.runtime import KEYRING, Runtime, trim_secret
from kustody.domain import keyset
from kustody.domain.backup import ANNOTATION_RESTORED
from kustody.domain.objects import ObjectMeta
from kustody.domain.secret import (
    LABEL_DATAKEY,
    LABEL_KEYRING,
    LABEL_VERSION,
    MANAGED_BY,
    MANAGER,
    SECRET_TYPE,
    SecretContent,
    differs,
    render,
)
from kustody.domain.specs import DataKeySpec
from kustody.kube.errors import KubeError
from kustody.kube.resources import DATAKEYS, SECRETS


def owned_by(secret: Mapping[str, Any], uid: str) -> bool:
    return any(r.uid == uid and r.controller for r in ObjectMeta.of(secret).owners)


def _owner_reference(meta: ObjectMeta) -> dict[str, Any]:
    return {
        "apiVersion": DATAKEYS.api_version,
        "kind": DATAKEYS.kind,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


async def live_secret(rt: Runtime, meta: ObjectMeta, name: str) -> Mapping[str, Any] | None:
    """The DataKey's Secret with its data: from the cache when it holds the data of the
    current version (our own last write), else one GET (the watch carries metadata only)."""
    namespace = meta.namespace or ""
    secret = rt.secrets.get(namespace, name)
    if secret is not None and "data" in secret:
        return secret
    secret = await rt.kube.get_or_none(SECRETS, name, namespace)
    if secret is not None and owned_by(secret, meta.uid):
        rt.secrets.put(trim_secret(secret), refresh=True)
    return secret


async def withdraw_plaintext(rt: Runtime, obj: Mapping[str, Any], spec: DataKeySpec) -> None:
    """Revocation reaches what was issued: the KeyRing no longer allows this namespace or
    plaintext export, so an owned Secret keeps only the wrapped key (no key is lost: the
    status and the Secret still hold it wrapped)."""
    meta = ObjectMeta.of(obj)
    secret = await live_secret(rt, meta, spec.secret_name)
    if secret is None or not owned_by(secret, meta.uid):
        return
    if spec.keys.plaintext not in (secret.get("data") or {}):
        return
    labels = {  # the chart's admission policy wants them on every write of ours
        MANAGED_BY: MANAGER,
        LABEL_DATAKEY: meta.name,
        LABEL_KEYRING: spec.key_ring,
        LABEL_VERSION: str((obj.get("status") or {}).get("keyRingVersion") or ""),
    }
    patch = {
        "metadata": {
            "resourceVersion": ObjectMeta.of(secret).resource_version,
            "labels": {k: v for k, v in labels.items() if v},
        },
        "data": {spec.keys.plaintext: None},
    }
    updated = await rt.kube.patch(SECRETS, spec.secret_name, patch, meta.namespace)
    rt.secrets.put(trim_secret(updated))
    await rt.events.warning(
        obj,
        "PlaintextWithdrawn",
        f"removed entry {spec.keys.plaintext} from Secret {spec.secret_name}: the KeyRing "
        "no longer allows this namespace or plaintext export",
    )


async def desired(p: DataKeyPass) -> SecretContent:
    """What the Secret must hold: the current generation wrapped, the wrapped keyset, and the
    plaintext only where the spec asks and the KeyRing allows it."""
    current = keyset.primary(p.generations)
    assert current is not None
    plaintext = None
    if p.spec.expose_plaintext and p.keyring.spec.allow_plaintext_export:
        plaintext = await p.rt.call_hsm(
            "Decrypt",
            p.rt.hsm.decrypt(current.wrapped, p.binding, allow_plaintext_export=True),
        )
    return render(
        p.namespace,
        p.name,
        p.spec,
        wrapped=current.wrapped,
        version=current.version,
        generation=current.generation,
        plaintext=plaintext,
        keyset=keyset.wrapped_keyset_document(p.generations),
    )


async def publish(
    p: DataKeyPass, live: Mapping[str, Any] | None, content: SecretContent, *, adopt: bool
) -> bool:
    """Create or correct the Secret; returns True if an existing one had drifted.
    ``adopt``: the live Secret is a verified one this DataKey takes over (ownerReference)."""
    if live is None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SECRET_TYPE,
            "metadata": {
                "name": p.spec.secret_name,
                "namespace": p.namespace,
                "labels": dict(content.labels),
                "annotations": dict(content.annotations),
                "ownerReferences": [_owner_reference(p.meta)],
            },
            "data": dict(content.data),
        }
        # A Conflict (someone created it meanwhile) ends this pass; the next one looks again.
        _check_written(p.rt, content, await p.rt.kube.create(SECRETS, body, p.namespace))
        return False
    if not adopt and not differs(content, live):
        return False
    live_data = live.get("data") or {}
    patch: dict[str, Any] = {
        "metadata": {
            "labels": dict(content.labels),
            "annotations": dict(content.annotations),
            "resourceVersion": ObjectMeta.of(live).resource_version,
        },
        # Entries we do not publish are removed (null), so the Secret has exactly our data.
        "data": {**{k: None for k in live_data if k not in content.data}, **content.data},
    }
    if adopt:
        patch["metadata"]["ownerReferences"] = [_owner_reference(p.meta)]
        patch["metadata"]["annotations"][ANNOTATION_RESTORED] = None
    stored = await p.rt.kube.patch(SECRETS, p.spec.secret_name, patch, p.namespace)
    _check_written(p.rt, content, stored)
    return dict(live_data) != dict(content.data)


class NotAsWritten(KubeError):
    """The API server accepted a Secret write but stored something else."""


def _check_written(rt: Runtime, content: SecretContent, stored: Mapping[str, Any]) -> None:
    """The write's response is what the API server stored: it must be what we wrote (an
    admission webhook may have changed it)."""
    rt.secrets.put(trim_secret(stored))
    # The version the Secret is labelled with is a reference of its KeyRing, and the watch
    # echo of this write changes nothing in the store: look at the KeyRing again from here
    # (a pass made between the status write and this one saw the old version and waits).
    if ring := content.labels.get(LABEL_KEYRING):
        rt.enqueue(KEYRING, None, ring, delay=rt.keyring_delay(ring))
    if differs(content, stored):
        raise NotAsWritten(
            0,
            "NotAsWritten",
            "the API server stored a different Secret than was written (a mutating admission "
            "webhook?)",
        )
