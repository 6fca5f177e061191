"""DataKey reconciler: one DEK per DataKey, published only wrapped in the DataKey's Secret.

Order of writes, chosen so that a crash at any line loses nothing:
1. new key material or a re-wrap is recorded in the DataKey's status first (the source of
   truth, written with the object's resourceVersion so a stale view cannot overwrite it);
2. then the Secret is created or brought in line with the status;
3. then rollout restarts, which are idempotent per DEK generation.
A rerun after a crash finds the status and finishes steps 2 and 3; it never generates twice.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from kustody.domain.conditions import Condition, merge
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError, InvalidSpec
from kustody.domain.schedule import in_window
from kustody.domain.secret import SECRET_TYPE, SecretContent, differs, render
from kustody.domain.specs import (
    REWRAP_ANNOTATION,
    DataKeySpec,
    KeyRingSpec,
    Rewrap,
    RotationPolicySpec,
)
from kustody.domain.timestamps import format_time, parse_time
from kustody.handlers.runtime import KEYRING, Runtime, trim_secret
from kustody.hsm.client import Binding, GenerateItem, HsmError
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
    patch = {
        "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
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
    status: dict[str, Any] = dict(obj.get("status") or {})
    now = rt.clock()
    binding = Binding(namespace, name, dict(spec.encryption_context))

    secret = await _live_secret(rt, namespace, spec.secret_name, uid)
    if secret is not None and not _owned_by(secret, uid):
        await _set_not_ready(
            rt,
            obj,
            "SecretConflict",
            f"Secret {spec.secret_name} exists and is not owned by this DataKey; it is left "
            "untouched (delete it or choose another spec.secretName)",
        )
        return None

    wrapped = status.get("wrappedKey")
    if wrapped and (problem := _envelope_problem(wrapped, spec.key_ring)):
        await _set_not_ready(rt, obj, "EnvelopeMismatch", problem)
        return None
    version = int(status.get("keyRingVersion") or 0)
    generation = int(status.get("dekGeneration") or 0)
    generated_at = parse_time(status.get("lastGeneratedAt"))
    event: tuple[str, str] | None = None
    try:
        if not wrapped or (
            spec.regenerate_after is not None
            and generated_at is not None
            and now >= generated_at + spec.regenerate_after
        ):
            key = await rt.generate(
                GenerateItem(spec.key_ring, binding, version=primary, length=spec.length)
            )
            wrapped, version, generation = key.wrapped, key.version, generation + 1
            status["lastGeneratedAt"] = format_time(now)
            rt.metrics.generations.inc()
            event = (
                ("Created", f"generated data key (generation 1) under {spec.key_ring} v{version}")
                if generation == 1
                else (
                    "Regenerated",
                    f"generated new data key material (generation {generation}) after "
                    f"regenerateAfter, under {spec.key_ring} v{version}",
                )
            )
        elif version != primary and _rewrap_allowed(
            rt, kr_spec, keyring, now, parse_time(status.get("lastRewrapAt"))
        ):
            moved = await rt.rewrap(wrapped, binding, primary)
            old, wrapped, version = version, moved.wrapped, moved.to_version
            status["lastRewrapAt"] = format_time(now)
            rt.metrics.rewraps.inc()
            event = ("Rewrapped", f"re-wrapped data key from {spec.key_ring} v{old} to v{version}")
    except HsmError as exc:
        await _hsm_failed(rt, obj, bool(wrapped) and secret is not None, exc)
        raise

    content = await _desired_secret(
        rt, namespace, name, spec, kr_spec, wrapped, version, generation, binding
    )
    # 1. The key material goes into the status first: it is the record everything else is
    #    restored from, so a crash after this line loses nothing.
    status.update(
        wrappedKey=wrapped,
        keyRingVersion=version,
        dekGeneration=generation,
        secretRef={"name": spec.secret_name},
        observedGeneration=meta.get("generation"),
    )
    recorded = await _write_status(rt, obj, status)
    if recorded is not obj:
        rt.enqueue(KEYRING, None, spec.key_ring, delay=1.0)  # its references and Rotating
    obj = recorded
    if event is not None:
        await rt.events.normal(obj, *event)

    # 2. Then the Secret. A write the API server refuses makes the DataKey not Ready.
    try:
        restored = await _publish(rt, obj, spec, secret, content)
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
    if restored:
        await rt.events.warning(
            obj, "SecretRestored", f"Secret {spec.secret_name} was missing or edited; restored"
        )

    # 3. Only now, with the Secret written and its response checked, Ready. (The version is
    #    in status.keyRingVersion; leaving it out of the message spares a write per re-wrap.)
    ready = Condition(
        "Ready",
        True,
        "KeyAvailable",
        f"Secret {spec.secret_name} holds the data key (generation {generation}) wrapped "
        f"under KeyRing {spec.key_ring}",
    )
    done = dict(obj.get("status") or {})
    done["conditions"] = merge(
        done.get("conditions") or (), [ready], meta.get("generation") or 0, now
    )
    obj = await _write_status(rt, obj, done)
    if generation >= 2:
        await _restart_targets(rt, obj, spec, generation)

    if spec.regenerate_after is not None:
        due = parse_time(status.get("lastGeneratedAt"))
        if due is not None:
            return max(1.0, (due + spec.regenerate_after - now).total_seconds())
    return None


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
    wrapped: str,
    version: int,
    generation: int,
    binding: Binding,
) -> SecretContent:
    plaintext = None
    if spec.expose_plaintext and kr_spec.allow_plaintext_export:
        plaintext = await rt.call_hsm(
            "Decrypt", rt.hsm.decrypt(wrapped, binding, allow_plaintext_export=True)
        )
    return render(
        namespace,
        name,
        spec,
        wrapped=wrapped,
        version=version,
        generation=generation,
        plaintext=plaintext,
    )


async def _publish(
    rt: Runtime,
    obj: Mapping[str, Any],
    spec: DataKeySpec,
    live: Mapping[str, Any] | None,
    content: SecretContent,
) -> bool:
    """Create or correct the Secret; returns True if an existing one had drifted."""
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
    if not differs(content, live):
        return False
    live_data = live.get("data") or {}
    patch = {
        "metadata": {
            "labels": dict(content.labels),
            "annotations": dict(content.annotations),
            "resourceVersion": live["metadata"]["resourceVersion"],
        },
        # Entries we do not publish are removed (null), so the Secret has exactly our data.
        "data": {**{k: None for k in live_data if k not in content.data}, **content.data},
    }
    _check_written(content, await rt.kube.patch(SECRETS, spec.secret_name, patch, namespace), rt)
    return dict(live_data) != dict(content.data)


class _NotAsWritten(KubeError):
    """The API server accepted a Secret write but stored something else."""


def _check_written(content: SecretContent, stored: Mapping[str, Any], rt: Runtime) -> None:
    """The write's response is what the API server stored: it must be what we wrote (an
    admission webhook may have changed it)."""
    rt.secrets.put(trim_secret(stored))
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
