"""Adoption: a re-created DataKey takes over the generations of a Secret Kustody wrote for a
DataKey of the same name (restored from a backup or left by a cluster rebuild), after the
sidecar has shown that every wrapped key opens under this DataKey's binding."""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from kustody.api.client import HsmError, Reason, ReWrapped
from kustody.controller.datakey.keyring import envelope_problem
from kustody.controller.datakey.state import DataKeyPass, NotReady
from kustody.domain import keyset
from kustody.domain.objects import ObjectMeta
from kustody.domain.secret import LABEL_DATAKEY, LABEL_KEYRING, MANAGED_BY, MANAGER
from kustody.domain.timestamps import format_time
from kustody.kube.resources import DATAKEYS

# Sidecar answers that mean "this wrapped key does not belong to this DataKey": nothing is
# adopted. Any other failure (token unavailable, ...) is retried; no key is generated meanwhile.
_NOT_ITS_KEY = frozenset(
    {
        Reason.AAD_MISMATCH,
        Reason.MALFORMED_ENVELOPE,
        Reason.VERSION_NOT_FOUND,
        Reason.VERSION_DISABLED,
        Reason.VERSION_DESTROYED,
        Reason.KEY_NOT_TRUSTED,
        Reason.INVALID_ARGUMENT,
    }
)


def adoptable(p: DataKeyPass, secret: Mapping[str, Any]) -> list[keyset.Generation]:
    """The generations of a Secret not owned by this DataKey that it may adopt, or NotReady
    (SecretConflict) saying why not. Nothing here is trusted yet: :func:`adopt` still has the
    sidecar open every wrapped key under this DataKey's binding."""
    found = _candidate(p, secret)
    if isinstance(found, list) and p.generations:
        # Adopted before a crash (status written, Secret not yet owned): the same keys.
        same = {g.key_id for g in p.generations} >= {g.key_id for g in found}
        found = found if same else "it holds other keys than this DataKey"
    if isinstance(found, str):
        raise NotReady(
            "SecretConflict",
            f"Secret {p.spec.secret_name} exists and is not owned by this DataKey "
            f"({found}); it is left untouched (delete it or choose another spec.secretName)",
        )
    return found


def _candidate(p: DataKeyPass, secret: Mapping[str, Any]) -> list[keyset.Generation] | str:
    meta, spec = ObjectMeta.of(secret), p.spec
    if (
        meta.labels.get(MANAGED_BY) != MANAGER
        or meta.labels.get(LABEL_DATAKEY) != p.name
        or meta.labels.get(LABEL_KEYRING) != spec.key_ring
    ):
        return (
            f"not a Kustody Secret of DataKey {p.name} under KeyRing {spec.key_ring}: "
            f"labels {MANAGED_BY}, {LABEL_DATAKEY} and {LABEL_KEYRING} do not match"
        )
    for ref in meta.owners:
        if ref.controller and (ref.kind != DATAKEYS.kind or ref.name != p.name):
            return f"it is controlled by {ref.kind} {ref.name}"
    raw = (secret.get("data") or {}).get(spec.keys.keyset)
    if not raw:
        return f"it has no {spec.keys.keyset} entry to adopt"
    try:
        return keyset.parse_keyset_document(base64.b64decode(raw, validate=True), p.now)
    except (ValueError, binascii.Error) as exc:
        return f"its {spec.keys.keyset} entry cannot be adopted: {exc}"


async def adopt(p: DataKeyPass, found: list[keyset.Generation]) -> None:
    """Take over ``found`` instead of generating a DEK, after the sidecar has opened every one
    under this DataKey's binding (a ReWrap: it decrypts inside the sidecar with the binding as
    AAD, so the key material never reaches the operator) and wrapped it under the primary
    version. Key ids and generation numbers stay as recorded, so ciphertexts made before the
    rebuild still name keys of the keyset."""
    spec, primary, rt = p.spec, p.keyring.primary, p.rt
    for g in found:
        if problem := envelope_problem(g.wrapped, spec.key_ring):
            raise NotReady("AdoptionRefused", f"Secret {spec.secret_name}: {problem}")
    moved = await asyncio.gather(
        *(rt.rewrap(g.wrapped, p.binding, primary) for g in found), return_exceptions=True
    )
    for g, result in zip(found, moved, strict=True):
        if isinstance(result, HsmError) and result.reason in _NOT_ITS_KEY:
            rt.metrics.adoptions.labels("refused").inc()
            raise NotReady(
                "AdoptionRefused",
                f"Secret {spec.secret_name} was not adopted: generation {g.generation} (key "
                f"id {g.key_id:08x}) does not decrypt under this DataKey's binding "
                f"({result.reason}); no key is generated while it is there (delete it to "
                "start with a new key)",
            )
        if isinstance(result, BaseException):
            raise result
    p.generations = [
        replace(g, wrapped=m.wrapped, version=m.to_version)
        for g, m in zip(found, moved, strict=True)
        if isinstance(m, ReWrapped)
    ]
    p.status["lastGeneratedAt"] = format_time(p.now)
    p.status["adoptedAt"] = format_time(p.now)
    rt.metrics.adoptions.labels("adopted").inc()
    ids = ", ".join(f"{g.key_id:08x}" for g in p.generations)
    p.note(
        "Adopted",
        f"adopted {len(found)} generation(s) (key ids {ids}) from Secret {spec.secret_name} "
        f"after the HSM sidecar verified each decrypts under this DataKey's binding; no new "
        f"data key was generated; wrapped under {spec.key_ring} v{primary}",
    )
