"""Whether the DataKey may use its KeyRing now, and whether a wrapped key belongs to it."""

from __future__ import annotations

from kustody.controller.datakey.state import KeyRingView, NotReady
from kustody.controller.runtime import Runtime
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError, InvalidSpec
from kustody.domain.objects import ObjectMeta
from kustody.domain.specs import DataKeySpec, KeyRingSpec


def check_keyring(rt: Runtime, namespace: str, spec: DataKeySpec) -> KeyRingView:
    """The KeyRing, or NotReady: missing, unusable, not allowing this namespace or plaintext
    export (both revoke a published plaintext entry), deleting, or without a primary."""
    keyring = rt.keyrings.get(None, spec.key_ring)
    if keyring is None:
        raise NotReady("KeyRingNotFound", f"KeyRing {spec.key_ring} does not exist; waiting for it")
    try:
        kr_spec = KeyRingSpec.parse(keyring.get("spec"))
    except InvalidSpec as exc:
        raise NotReady(
            "KeyRingNotReady", f"KeyRing {spec.key_ring} has an unusable spec: {exc}"
        ) from None
    if not rt.namespace_allowed(kr_spec.allowed, namespace):
        raise NotReady(
            "NamespaceNotAllowed",
            f"KeyRing {spec.key_ring} does not allow namespace {namespace} "
            "(spec.allowedNamespaces); no key is made or re-wrapped here, unwraps are refused",
            revokes_plaintext=True,
        )
    if spec.expose_plaintext and not kr_spec.allow_plaintext_export:
        raise NotReady(
            "PlaintextExportNotAllowed",
            f"spec.exposePlaintext is set but KeyRing {spec.key_ring} does not allow "
            "plaintext export; no plaintext is published",
            revokes_plaintext=True,
        )
    meta = ObjectMeta.of(keyring)
    primary = (keyring.get("status") or {}).get("primaryVersion")
    if meta.deleting:
        raise NotReady("KeyRingDeleting", f"KeyRing {spec.key_ring} is being deleted")
    if not primary:
        raise NotReady(
            "KeyRingNotReady", f"KeyRing {spec.key_ring} has no primary version yet; waiting"
        )
    return KeyRingView(keyring, meta, kr_spec, int(primary))


def envelope_problem(wrapped: str, key_ring: str) -> str | None:
    """Why a wrapped key must not be used for this DataKey, if it must not: it has to be an
    envelope of the KeyRing the spec names (whose export policy is applied to it)."""
    try:
        ring = Envelope.from_text(wrapped).key.key_ring
    except DomainError as exc:
        return f"status.wrappedKey is not a Kustody envelope ({exc}); it is not used"
    if ring != key_ring:
        return (
            f"status.wrappedKey is wrapped under KeyRing {ring}, but spec.keyRingRef names "
            f"{key_ring}; it is neither decrypted nor re-wrapped"
        )
    return None
