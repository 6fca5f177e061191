"""DataKey reconciler: one DEK per DataKey, published only wrapped in the DataKey's Secret.

Order of writes, chosen so that a crash at any line loses nothing:
1. new key material or a re-wrap is recorded in the DataKey's status first (the source of
   truth, written with the object's resourceVersion so a stale view cannot overwrite it);
2. then the Secret is created or brought in line with the status;
3. then rollout restarts, which are idempotent per DEK generation.
A rerun after a crash finds the status and finishes steps 2 and 3; it never generates twice.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from kustody.api.client import Binding, GenerateItem, HsmError, Reason, ReWrapped
from kustody.controller.runtime import KEYRING, Runtime, trim_secret
from kustody.domain import keyset
from kustody.domain.backup import ANNOTATION_RESTORED
from kustody.domain.conditions import Condition, merge
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError, InvalidSpec
from kustody.domain.schedule import in_window
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
from kustody.domain.specs import (
    REWRAP_ANNOTATION,
    DataKeySpec,
    KeyRingSpec,
    Rewrap,
    RotationPolicySpec,
)
from kustody.domain.timestamps import format_time, parse_time
from kustody.kube import workloads
from kustody.kube.errors import Conflict, KubeError, NotFound, Unavailable
from kustody.kube.resources import DATAKEYS, SECRETS


class _NotReady(Exception):
    """The DataKey cannot be served now; Ready=False with this reason and message.
    ``revokes_plaintext``: a plaintext entry already published must be withdrawn."""

    def __init__(self, reason: str, message: str, *, revokes_plaintext: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.revokes_plaintext = revokes_plaintext


def _owned_by(secret: Mapping[str, Any], uid: str) -> bool:
    refs = (secret.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("uid") == uid and r.get("controller") for r in refs)


def _owner_reference(obj: Mapping[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": DATAKEYS.api_version,
        "kind": DATAKEYS.kind,
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _policy(rt: Runtime, keyring: KeyRingSpec) -> RotationPolicySpec | None:
    if keyring.policy_name is None:
        return None
    obj = rt.policies.get(None, keyring.policy_name)
    if obj is None:
        return None
    try:
        return RotationPolicySpec.parse(obj.get("spec") or {})
    except (DomainError, KeyError, ValueError):
        return None


async def reconcile(rt: Runtime, namespace: str, name: str) -> float | None:
    """One pass; returns seconds until the next pass is needed (None: only on change)."""
    obj = rt.datakeys.get(namespace, name)
    if obj is None or (obj.get("metadata") or {}).get("deletionTimestamp"):
        return None  # the Secret goes with it (ownerReference → garbage collector)
    try:
        spec = DataKeySpec.parse(obj.get("spec"))
    except InvalidSpec as exc:
        await _set_not_ready(rt, obj, "InvalidSpec", f"The spec cannot be used: {exc}.")
        return None
    try:
        keyring, kr_spec, primary = _check_keyring(rt, namespace, spec)
    except _NotReady as exc:
        if exc.revokes_plaintext:
            await _withdraw_plaintext(rt, obj, spec)
        await _set_not_ready(rt, obj, exc.reason, exc.message)
        return None
    return await _converge(rt, obj, spec, keyring, kr_spec, primary)


async def _live_secret(
    rt: Runtime, namespace: str, name: str, uid: str
) -> Mapping[str, Any] | None:
    """The DataKey's Secret with its data: from the cache when it holds the data of the
    current version (our own last write), else one GET (the watch carries metadata only)."""
    secret = rt.secrets.get(namespace, name)
    if secret is not None and "data" in secret:
        return secret
    secret = await rt.kube.get_or_none(SECRETS, name, namespace)
    if secret is not None and _owned_by(secret, uid):
        rt.secrets.put(trim_secret(secret), refresh=True)
    return secret


async def _withdraw_plaintext(rt: Runtime, obj: Mapping[str, Any], spec: DataKeySpec) -> None:
    """Revocation reaches what was issued: the KeyRing no longer allows this namespace or
    plaintext export, so an owned Secret keeps only the wrapped key (no key is lost: the
    status and the Secret still hold it wrapped)."""
    meta = obj["metadata"]
    secret = await _live_secret(rt, meta["namespace"], spec.secret_name, meta["uid"])
    if secret is None or not _owned_by(secret, meta["uid"]):
        return
    if spec.keys.plaintext not in (secret.get("data") or {}):
        return
    labels = {  # the chart's admission policy wants them on every write of ours
        MANAGED_BY: MANAGER,
        LABEL_DATAKEY: meta["name"],
        LABEL_KEYRING: spec.key_ring,
        LABEL_VERSION: str((obj.get("status") or {}).get("keyRingVersion") or ""),
    }
    patch = {
        "metadata": {
            "resourceVersion": secret["metadata"]["resourceVersion"],
            "labels": {k: v for k, v in labels.items() if v},
        },
        "data": {spec.keys.plaintext: None},
    }
    updated = await rt.kube.patch(SECRETS, spec.secret_name, patch, meta["namespace"])
    rt.secrets.put(trim_secret(updated))
    await rt.events.warning(
        obj,
        "PlaintextWithdrawn",
        f"removed entry {spec.keys.plaintext} from Secret {spec.secret_name}: the KeyRing "
        "no longer allows this namespace or plaintext export",
    )


def _envelope_problem(wrapped: str, key_ring: str) -> str | None:
    """Why ``status.wrappedKey`` must not be used for this DataKey, if it must not: it has to
    be an envelope of the KeyRing the spec names (whose export policy is applied to it)."""
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


def _check_keyring(
    rt: Runtime, namespace: str, spec: DataKeySpec
) -> tuple[Mapping[str, Any], KeyRingSpec, int]:
    keyring = rt.keyrings.get(None, spec.key_ring)
    if keyring is None:
        raise _NotReady(
            "KeyRingNotFound", f"KeyRing {spec.key_ring} does not exist; waiting for it"
        )
    try:
        kr_spec = KeyRingSpec.parse(keyring.get("spec"))
    except InvalidSpec as exc:
        raise _NotReady(
            "KeyRingNotReady", f"KeyRing {spec.key_ring} has an unusable spec: {exc}"
        ) from None
    if not rt.namespace_allowed(kr_spec.allowed, namespace):
        raise _NotReady(
            "NamespaceNotAllowed",
            f"KeyRing {spec.key_ring} does not allow namespace {namespace} "
            "(spec.allowedNamespaces); no key is made or re-wrapped here, unwraps are refused",
            revokes_plaintext=True,
        )
    if spec.expose_plaintext and not kr_spec.allow_plaintext_export:
        raise _NotReady(
            "PlaintextExportNotAllowed",
            f"spec.exposePlaintext is set but KeyRing {spec.key_ring} does not allow "
            "plaintext export; no plaintext is published",
            revokes_plaintext=True,
        )
    primary = (keyring.get("status") or {}).get("primaryVersion")
    if (keyring.get("metadata") or {}).get("deletionTimestamp"):
        raise _NotReady("KeyRingDeleting", f"KeyRing {spec.key_ring} is being deleted")
    if not primary:
        raise _NotReady(
            "KeyRingNotReady", f"KeyRing {spec.key_ring} has no primary version yet; waiting"
        )
    return keyring, kr_spec, int(primary)


@dataclass
class _Keys:
    """What one pass changes about a DataKey's generations, and the Events it owes."""

    generations: list[keyset.Generation]
    status: dict[str, Any]
    annotations: Mapping[str, str]
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)
    regenerated: bool = False

    def note(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(("Warning" if warning else "Normal", reason, message))


async def _converge(
    rt: Runtime,
    obj: Mapping[str, Any],
    spec: DataKeySpec,
    keyring: Mapping[str, Any],
    kr_spec: KeyRingSpec,
    primary: int,
) -> float | None:
    meta = obj["metadata"]
    namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
    now = rt.clock()
    binding = Binding(namespace, name, dict(spec.encryption_context))

    status: dict[str, Any] = dict(obj.get("status") or {})
    keys = _Keys(keyset.from_status(status, uid), status, meta.get("annotations") or {})
    secret = await _live_secret(rt, namespace, spec.secret_name, uid)
    found: list[keyset.Generation] | None = None
    if secret is not None and not _owned_by(secret, uid):
        found_or_why = _adoptable(secret, name, spec, now)
        if isinstance(found_or_why, list) and keys.generations:
            # Adopted before a crash (status written, Secret not yet owned): the same keys.
            same = {g.key_id for g in keys.generations} >= {g.key_id for g in found_or_why}
            found_or_why = found_or_why if same else "it holds other keys than this DataKey"
        if isinstance(found_or_why, str):
            await _set_not_ready(
                rt,
                obj,
                "SecretConflict",
                f"Secret {spec.secret_name} exists and is not owned by this DataKey "
                f"({found_or_why}); it is left untouched (delete it or choose another "
                "spec.secretName)",
            )
            return None
        found = found_or_why

    for g in keys.generations:
        if problem := _envelope_problem(g.wrapped, spec.key_ring):
            await _set_not_ready(rt, obj, "EnvelopeMismatch", problem)
            return None
    try:
        if found is not None and not keys.generations:
            try:
                await _adopt(rt, keys, spec, binding, primary, found, now)
            except _NotReady as exc:
                await _set_not_ready(rt, obj, exc.reason, exc.message)
                return None
        await _generate_if_due(rt, keys, spec, binding, primary, uid, now)
        if _rewrap_allowed(rt, kr_spec, keyring, now, parse_time(status.get("lastRewrapAt"))):
            await _rewrap_generations(rt, keys, spec, binding, primary, now)
    except HsmError as exc:
        await _hsm_failed(rt, obj, bool(keys.generations) and secret is not None, exc)
        raise
    next_removal = _retain(rt, keys, spec, obj, now)

    current = keyset.primary(keys.generations)
    assert current is not None  # _generate_if_due made one
    content = await _desired_secret(rt, namespace, name, spec, kr_spec, keys, binding)
    # 1. The key material goes into the status first: it is the record everything else is
    #    restored from, so a crash after this line loses nothing.
    status.update(
        generations=keyset.to_status(keys.generations),
        wrappedKey=current.wrapped,
        keyRingVersion=current.version,
        dekGeneration=current.generation,
        secretRef={"name": spec.secret_name},
        observedGeneration=meta.get("generation"),
    )
    recorded = await _write_status(rt, obj, status)
    if recorded is not obj:
        rt.enqueue(KEYRING, None, spec.key_ring, delay=1.0)  # its references and Rotating
    obj = recorded
    for kind, reason, message in keys.events:
        await (rt.events.normal if kind == "Normal" else rt.events.warning)(obj, reason, message)

    # 2. Then the Secret. A write the API server refuses makes the DataKey not Ready.
    try:
        restored = await _publish(rt, obj, spec, secret, content, adopt=found is not None)
    except (Conflict, Unavailable):
        raise  # looked at again shortly (a newer object is on its way, or the API is down)
    except KubeError as exc:
        rt.metrics.secret_write_failures.inc()
        await _set_not_ready(
            rt,
            obj,
            "SecretWriteFailed",
            f"Secret {spec.secret_name} could not be written: {exc.message or exc.reason}",
        )
        raise
    if restored and found is None and not keys.events:
        # Only a pass that changed no key material writes the Secret because someone else
        # had edited it (after a re-wrap or a regeneration the new content is ours).
        await rt.events.warning(
            obj, "SecretRestored", f"Secret {spec.secret_name} was edited; restored"
        )

    # 3. Only now, with the Secret written and its response checked, Ready. (The version is
    #    in status.keyRingVersion; leaving it out of the message spares a write per re-wrap.)
    count = len(keys.generations)
    ready = Condition(
        "Ready",
        True,
        "KeyAvailable",
        f"Secret {spec.secret_name} holds the data key (generation {current.generation}"
        f"{f', {count} generations in the keyset' if count > 1 else ''}) wrapped under "
        f"KeyRing {spec.key_ring}",
    )
    done = dict(obj.get("status") or {})
    done["conditions"] = merge(
        done.get("conditions") or (), [ready], meta.get("generation") or 0, now
    )
    obj = await _write_status(rt, obj, done)
    if current.generation >= 2:
        await _restart_targets(rt, obj, spec, current.generation)

    due = [t for t in (next_removal, _regeneration_due(spec, status)) if t is not None]
    return max(1.0, (min(due) - now).total_seconds()) if due else None


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


def _adoptable(
    secret: Mapping[str, Any], name: str, spec: DataKeySpec, now: dt.datetime
) -> list[keyset.Generation] | str:
    """The generations of a Secret a re-created DataKey may adopt (same namespace, name and
    KeyRing: a Secret Kustody wrote for a DataKey of this name, restored from a backup or
    left by a cluster rebuild), or why it may not. Nothing here is trusted yet: the sidecar
    still has to show that every wrapped key opens under this DataKey's binding."""
    meta = secret.get("metadata") or {}
    labels = meta.get("labels") or {}
    if (
        labels.get(MANAGED_BY) != MANAGER
        or labels.get(LABEL_DATAKEY) != name
        or labels.get(LABEL_KEYRING) != spec.key_ring
    ):
        return (
            f"not a Kustody Secret of DataKey {name} under KeyRing {spec.key_ring}: "
            f"labels {MANAGED_BY}, {LABEL_DATAKEY} and {LABEL_KEYRING} do not match"
        )
    for ref in meta.get("ownerReferences") or ():
        if ref.get("controller") and (ref.get("kind") != DATAKEYS.kind or ref.get("name") != name):
            return f"it is controlled by {ref.get('kind')} {ref.get('name')}"
    raw = (secret.get("data") or {}).get(spec.keys.keyset)
    if not raw:
        return f"it has no {spec.keys.keyset} entry to adopt"
    try:
        return keyset.parse_keyset_document(base64.b64decode(raw, validate=True), now)
    except (ValueError, binascii.Error) as exc:
        return f"its {spec.keys.keyset} entry cannot be adopted: {exc}"


async def _adopt(
    rt: Runtime,
    keys: _Keys,
    spec: DataKeySpec,
    binding: Binding,
    primary: int,
    found: list[keyset.Generation],
    now: dt.datetime,
) -> None:
    """Take over the generations of an existing Secret instead of generating a DEK, after the
    sidecar has opened every one under this DataKey's binding (a ReWrap: it decrypts inside
    the sidecar with the binding as AAD, so the key material never reaches the operator) and
    wrapped it under the primary version. Key ids and generation numbers stay as recorded,
    so ciphertexts made before the rebuild still name keys of the keyset."""
    for g in found:
        if problem := _envelope_problem(g.wrapped, spec.key_ring):
            raise _NotReady("AdoptionRefused", f"Secret {spec.secret_name}: {problem}")
    moved = await asyncio.gather(
        *(rt.rewrap(g.wrapped, binding, primary) for g in found), return_exceptions=True
    )
    for g, result in zip(found, moved, strict=True):
        if isinstance(result, HsmError) and result.reason in _NOT_ITS_KEY:
            rt.metrics.adoptions.labels("refused").inc()
            raise _NotReady(
                "AdoptionRefused",
                f"Secret {spec.secret_name} was not adopted: generation {g.generation} (key "
                f"id {g.key_id:08x}) does not decrypt under this DataKey's binding "
                f"({result.reason}); no key is generated while it is there (delete it to "
                "start with a new key)",
            )
        if isinstance(result, BaseException):
            raise result
    keys.generations = [
        replace(g, wrapped=m.wrapped, version=m.to_version)
        for g, m in zip(found, moved, strict=True)
        if isinstance(m, ReWrapped)
    ]
    keys.status["lastGeneratedAt"] = format_time(now)
    keys.status["adoptedAt"] = format_time(now)
    rt.metrics.adoptions.labels("adopted").inc()
    ids = ", ".join(f"{g.key_id:08x}" for g in keys.generations)
    keys.note(
        "Adopted",
        f"adopted {len(found)} generation(s) (key ids {ids}) from Secret {spec.secret_name} "
        f"after the HSM sidecar verified each decrypts under this DataKey's binding; no new "
        f"data key was generated; wrapped under {spec.key_ring} v{primary}",
    )


def _regeneration_due(spec: DataKeySpec, status: Mapping[str, Any]) -> dt.datetime | None:
    generated = parse_time(status.get("lastGeneratedAt"))
    if spec.regenerate_after is None or generated is None:
        return None
    return generated + spec.regenerate_after


async def _generate_if_due(
    rt: Runtime,
    keys: _Keys,
    spec: DataKeySpec,
    binding: Binding,
    primary: int,
    uid: str,
    now: dt.datetime,
) -> None:
    """New key material when there is none, or when regenerateAfter has passed. The earlier
    generations stay in the keyset, decrypt-only."""
    due = _regeneration_due(spec, keys.status)
    annotations = keys.annotations
    requested = annotations.get(keyset.REGENERATE_ANNOTATION)
    asked = bool(requested) and requested != keys.status.get("lastRegenerateRequest")
    if keys.generations and not asked and (due is None or now < due):
        return
    key = await rt.generate(
        GenerateItem(spec.key_ring, binding, version=primary, length=spec.length)
    )
    keys.generations = keyset.add_generation(
        keys.generations, uid=uid, wrapped=key.wrapped, version=key.version, now=now
    )
    keys.status["lastGeneratedAt"] = format_time(now)
    if asked:
        keys.status["lastRegenerateRequest"] = requested
    keys.regenerated = True
    rt.metrics.generations.inc()
    new = keyset.primary(keys.generations)
    assert new is not None
    if new.generation == 1:
        keys.note(
            "Created",
            f"generated data key (generation 1, key id {new.key_id:08x}) under "
            f"{spec.key_ring} v{key.version}",
        )
    else:
        keys.note(
            "Regenerated",
            f"generated new data key material (generation {new.generation}, key id "
            f"{new.key_id:08x}) {'on request' if asked else 'after regenerateAfter'}, under "
            f"{spec.key_ring} v{key.version}; "
            f"generation {new.generation - 1} stays in the keyset, decrypt-only",
        )


async def _rewrap_generations(
    rt: Runtime,
    keys: _Keys,
    spec: DataKeySpec,
    binding: Binding,
    primary: int,
    now: dt.datetime,
) -> None:
    """A KeyRing rotation re-wraps every generation still in the keyset (same DEKs)."""
    stale = [g for g in keys.generations if g.version != primary]
    if not stale:
        return
    moved = await asyncio.gather(*(rt.rewrap(g.wrapped, binding, primary) for g in stale))
    by_generation = {g.generation: m for g, m in zip(stale, moved, strict=True)}
    keys.generations = [
        replace(g, wrapped=by_generation[g.generation].wrapped,
                version=by_generation[g.generation].to_version)
        if g.generation in by_generation
        else g
        for g in keys.generations
    ]  # fmt: skip
    keys.status["lastRewrapAt"] = format_time(now)
    rt.metrics.rewraps.inc()
    old = sorted({g.version for g in stale})
    keys.note(
        "Rewrapped",
        f"re-wrapped {len(stale)} generation(s) from {spec.key_ring} "
        f"v{','.join(map(str, old))} to v{primary}",
    )


def _retain(
    rt: Runtime, keys: _Keys, spec: DataKeySpec, obj: Mapping[str, Any], now: dt.datetime
) -> dt.datetime | None:
    """Staged removal of decrypt-only generations, only as spec.retention asks."""
    kept = keyset.parse_keep(keys.annotations.get(keyset.KEEP_ANNOTATION))
    keys.generations, changes, due = keyset.plan_retention(
        keys.generations, spec.retention, kept, now
    )
    for change in changes:
        g = change.generation
        if change.kind == "RemovalScheduled":
            when = format_time(g.remove_at) if g.remove_at else "?"
            message = (
                f"generation {g.generation} (key id {g.key_id:08x}) will be removed from the "
                f"keyset at {when} (spec.retention); data encrypted under it becomes "
                f"unreadable then. To keep it: kustody datakey keep "
                f"{obj['metadata']['namespace']}/{obj['metadata']['name']} {g.generation}"
            )
            keys.note("GenerationRemovalScheduled", message, warning=True)
        elif change.kind == "RemovalCancelled":
            keys.note(
                "GenerationRemovalCancelled",
                f"generation {g.generation} (key id {g.key_id:08x}) stays in the keyset",
            )
        else:
            rt.metrics.generations_removed.inc()
            keys.note(
                "GenerationRemoved",
                f"generation {g.generation} (key id {g.key_id:08x}) removed from the keyset "
                "(its waiting period ended); data encrypted under it can no longer be "
                "decrypted",
                warning=True,
            )
    return due


async def _write_status(
    rt: Runtime, obj: Mapping[str, Any], status: Mapping[str, Any]
) -> Mapping[str, Any]:
    """Patch ``status`` (guarded by resourceVersion) if it differs; returns the object."""
    if dict(status) == (obj.get("status") or {}):
        return obj
    meta = obj["metadata"]
    updated = await rt.kube.patch_status(
        DATAKEYS,
        meta["name"],
        status,
        meta["namespace"],
        resource_version=meta.get("resourceVersion"),
    )
    rt.datakeys.put(updated)
    return updated


def _rewrap_allowed(
    rt: Runtime,
    kr_spec: KeyRingSpec,
    keyring: Mapping[str, Any],
    now: dt.datetime,
    last_rewrap: dt.datetime | None,
) -> bool:
    # `kustody rewrap KEYRING`: DataKeys not re-wrapped since the request move now, even
    # under rewrap: Manual and outside the maintenance window (it is a deliberate act).
    asked = parse_time((keyring["metadata"].get("annotations") or {}).get(REWRAP_ANNOTATION))
    if asked is not None and (last_rewrap is None or last_rewrap < asked):
        return True
    policy = _policy(rt, kr_spec)
    if policy is not None and policy.rewrap is Rewrap.MANUAL:
        return False
    if policy is None or policy.window is None:
        return True
    requested = (keyring.get("status") or {}).get("lastRotationReason") == "Requested"
    return requested or in_window(policy.window, now)


async def _desired_secret(
    rt: Runtime,
    namespace: str,
    name: str,
    spec: DataKeySpec,
    kr_spec: KeyRingSpec,
    keys: _Keys,
    binding: Binding,
) -> SecretContent:
    current = keyset.primary(keys.generations)
    assert current is not None
    plaintext = None
    if spec.expose_plaintext and kr_spec.allow_plaintext_export:
        plaintext = await rt.call_hsm(
            "Decrypt", rt.hsm.decrypt(current.wrapped, binding, allow_plaintext_export=True)
        )
    return render(
        namespace,
        name,
        spec,
        wrapped=current.wrapped,
        version=current.version,
        generation=current.generation,
        plaintext=plaintext,
        keyset=keyset.wrapped_keyset_document(keys.generations),
    )


async def _publish(
    rt: Runtime,
    obj: Mapping[str, Any],
    spec: DataKeySpec,
    live: Mapping[str, Any] | None,
    content: SecretContent,
    *,
    adopt: bool = False,
) -> bool:
    """Create or correct the Secret; returns True if an existing one had drifted.
    ``adopt``: the live Secret is a verified one this DataKey takes over (ownerReference)."""
    namespace = obj["metadata"]["namespace"]
    if live is None:
        body = {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": SECRET_TYPE,
            "metadata": {
                "name": spec.secret_name,
                "namespace": namespace,
                "labels": dict(content.labels),
                "annotations": dict(content.annotations),
                "ownerReferences": [_owner_reference(obj)],
            },
            "data": dict(content.data),
        }
        # A Conflict (someone created it meanwhile) ends this pass; the next one looks again.
        _check_written(content, await rt.kube.create(SECRETS, body, namespace), rt)
        return False
    if not adopt and not differs(content, live):
        return False
    live_data = live.get("data") or {}
    patch: dict[str, Any] = {
        "metadata": {
            "labels": dict(content.labels),
            "annotations": dict(content.annotations),
            "resourceVersion": live["metadata"]["resourceVersion"],
        },
        # Entries we do not publish are removed (null), so the Secret has exactly our data.
        "data": {**{k: None for k in live_data if k not in content.data}, **content.data},
    }
    if adopt:
        patch["metadata"]["ownerReferences"] = [_owner_reference(obj)]
        patch["metadata"]["annotations"][ANNOTATION_RESTORED] = None
    _check_written(content, await rt.kube.patch(SECRETS, spec.secret_name, patch, namespace), rt)
    return dict(live_data) != dict(content.data)


class _NotAsWritten(KubeError):
    """The API server accepted a Secret write but stored something else."""


def _check_written(content: SecretContent, stored: Mapping[str, Any], rt: Runtime) -> None:
    """The write's response is what the API server stored: it must be what we wrote (an
    admission webhook may have changed it)."""
    rt.secrets.put(trim_secret(stored))
    # The version the Secret is labelled with is a reference of its KeyRing, and the watch
    # echo of this write changes nothing in the store: look at the KeyRing again from here
    # (a pass made between the status write and this one saw the old version and waits).
    if ring := content.labels.get(LABEL_KEYRING):
        rt.enqueue(KEYRING, None, ring, delay=1.0)
    if differs(content, stored):
        raise _NotAsWritten(
            0,
            "NotAsWritten",
            "the API server stored a different Secret than was written (a mutating admission "
            "webhook?)",
        )


async def _restart_targets(
    rt: Runtime, obj: Mapping[str, Any], spec: DataKeySpec, generation: int
) -> None:
    namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    for target in spec.restart_targets:
        try:
            patched = await workloads.restart(
                rt.kube, namespace, target.kind, target.name, name, generation
            )
        except NotFound:
            await rt.events.warning(
                obj,
                "RolloutTargetNotFound",
                f"{target.kind} {target.name} does not exist; not restarted",
            )
            continue
        except workloads.NotOptedIn:
            await rt.events.warning(
                obj,
                "RolloutTargetNotOptedIn",
                f"{target.kind} {target.name} was not restarted: it must list this DataKey "
                f"in its annotation {workloads.OPT_IN_ANNOTATION}",
            )
            continue
        if patched:
            await rt.events.normal(
                obj,
                "RolloutRestartTriggered",
                f"restarted {target.kind} {target.name} for data key generation {generation}",
            )


async def _hsm_failed(
    rt: Runtime, obj: Mapping[str, Any], still_usable: bool, exc: HsmError
) -> None:
    message = f"HSM sidecar: {exc.reason}: {exc.message}"
    await rt.events.warning(obj, "HSMError", message)
    if not still_usable:
        await _set_not_ready(rt, obj, "HSMUnavailable", message)


async def _set_not_ready(rt: Runtime, obj: Mapping[str, Any], reason: str, message: str) -> None:
    meta = obj["metadata"]
    status = dict(obj.get("status") or {})
    condition = Condition("Ready", False, reason, message)
    status["conditions"] = merge(
        status.get("conditions") or (), [condition], meta.get("generation") or 0, rt.clock()
    )
    status["observedGeneration"] = meta.get("generation")
    if status == (obj.get("status") or {}):
        return
    try:
        updated = await rt.kube.patch_status(DATAKEYS, meta["name"], status, meta["namespace"])
    except NotFound:
        return
    rt.datakeys.put(updated)
    old = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or ()}
    if (old.get("Ready") or {}).get("reason") != reason:
        await rt.events.warning(obj, reason, message)
