"""Which KEK versions DataKeys still use: by their status and by their own Secret.

Only DataKeys in namespaces the KeyRing allows count, and a Secret counts only as the Secret
of such a DataKey (controlled by it, named by its status). A Secret that merely carries
Kustody's labels is nobody's reference: a tenant cannot re-enable a version, hold off a
destruction or block crypto-shredding with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kustody.controller.runtime import (
    Runtime,
    datakey_keyring,
    is_datakey_secret,
    status_secret_name,
)
from kustody.controller.store import key_of
from kustody.domain import lifecycle
from kustody.domain.lifecycle import References
from kustody.domain.objects import ObjectMeta
from kustody.domain.secret import LABEL_KEYRING, LABEL_VERSION, MANAGED_BY, MANAGER
from kustody.domain.specs import NamespaceSelector
from kustody.kube.resources import DATAKEYS, SECRETS


async def references(
    rt: Runtime, keyring: str, allowed: NamespaceSelector, *, fresh: bool
) -> References:
    """From the caches, or (``fresh``) from the API server right now: the view a
    destructive step must act on."""
    datakeys: Sequence[Mapping[str, Any]]
    secrets: Mapping[tuple[str, str], Mapping[str, Any]]
    if fresh:
        datakeys = [d for d in await rt.kube.list(DATAKEYS) if datakey_keyring(d) == keyring]
        listed, _ = await rt.kube.list_metadata(
            SECRETS, label_selector=f"{MANAGED_BY}={MANAGER},{LABEL_KEYRING}={keyring}"
        )
        secrets = {key_of(s): s for s in listed}
    else:
        datakeys = rt.datakeys.by_index(keyring)
        secrets = {key_of(s): s for s in rt.secrets.by_index(keyring)}
    used: list[tuple[frozenset[int], int | None]] = []
    for dk in datakeys:
        meta = ObjectMeta.of(dk)
        namespace = meta.namespace or ""
        if not rt.namespace_allowed(allowed, namespace):
            continue
        status = dk.get("status") or {}
        versions = set(rt.wrapping_versions(dk))
        if v := status.get("keyRingVersion"):
            versions.add(int(v))
        secret = secrets.get((namespace, status_secret_name(dk) or ""))
        genuine = secret is not None and is_datakey_secret(secret, dk)
        used.append((frozenset(versions), secret_version(secret) if genuine else None))
    return lifecycle.count_references(used)


def secret_version(secret: Mapping[str, Any] | None) -> int | None:
    """The KEK version a DataKey's Secret is labelled with."""
    value = ObjectMeta.of(secret or {}).labels.get(LABEL_VERSION)
    return int(value) if value is not None and value.isdigit() else None
