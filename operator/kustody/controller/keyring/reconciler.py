"""KeyRing reconciler: provisions KEK versions, rotates, retires and destroys them.

Each pass recomputes what is due from the KeyRing's status, its RotationPolicy, what
references each version, and the clock (``domain.lifecycle.plan``), then makes the HSM
match. Every HSM call is idempotent (deterministic version objects), and the status is
written right after each change with the object's resourceVersion, so a crash or a stale
view repeats at most an idempotent step.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from kustody.api.client import HsmError, Reason, VersionState
from kustody.controller.escrow import reconciler as escrow
from kustody.controller.runtime import (
    Runtime,
    datakey_keyring,
    is_datakey_secret,
    matters_to_datakeys,
    status_secret_name,
)
from kustody.controller.store import key_of
from kustody.domain import keyset, lifecycle
from kustody.domain.conditions import Condition, merge
from kustody.domain.errors import InvalidSpec
from kustody.domain.lifecycle import ActionKind, References, State, Version
from kustody.domain.rotation import decide
from kustody.domain.secret import LABEL_KEYRING, LABEL_VERSION, MANAGED_BY, MANAGER
from kustody.domain.specs import (
    RESTORE_ANNOTATION,
    ROTATE_ANNOTATION,
    DeletionPolicy,
    KeyRingSpec,
    NamespaceSelector,
    Rewrap,
    RotationPolicySpec,
    parse_restore_request,
)
from kustody.domain.timestamps import format_time, parse_time
from kustody.kube.resources import DATAKEYS, KEYRINGS, SECRETS

FINALIZER = "kustody.io/keyring-protection"
RESYNC_SECONDS = 300.0
_TOKEN_STATE = {
    VersionState.ENABLED: State.ENABLED,
    VersionState.DISABLED: State.DISABLED,
    VersionState.DESTROY_SCHEDULED: State.DESTROY_SCHEDULED,
    VersionState.DESTROYED: State.DESTROYED,
}
# What the token must say for each state of the status (the sidecar keeps its own record of
# a scheduled destruction and refuses DestroyVersion before its minimum waiting period).
_WANT_TOKEN = {
    State.ENABLED: VersionState.ENABLED,
    State.DISABLED: VersionState.DISABLED,
    State.DESTROY_SCHEDULED: VersionState.DESTROY_SCHEDULED,
}


class IntegrityError(Exception):
    """The token does not hold what the status recorded: act on nothing until it does."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class _Pass:
    """Mutable state of one reconcile pass over one KeyRing."""

    def __init__(self, rt: Runtime, obj: Mapping[str, Any]) -> None:
        self.rt = rt
        self.obj = obj
        self.name: str = obj["metadata"]["name"]
        self.status: dict[str, Any] = dict(obj.get("status") or {})
        self.versions = [Version.from_status(v) for v in self.status.get("versions") or ()]
        self.now = rt.clock()
        self.conditions: list[Condition] = []
        # spec.escrow: new versions are created extractable only under trusted keys.
        self.escrow = bool((obj.get("spec") or {}).get("escrow"))

    @property
    def primary(self) -> int | None:
        value = self.status.get("primaryVersion")
        return int(value) if value else None

    def set_versions(self, versions: Sequence[Version]) -> None:
        self.versions = sorted(versions, key=lambda v: v.version)
        self.status["versions"] = [v.to_status() for v in self.versions]

    async def save(self) -> None:
        """Write the status now (guarded by resourceVersion) if it changed."""
        meta = self.obj["metadata"]
        self.status["observedGeneration"] = meta.get("generation")
        self.status["conditions"] = merge(
            self.status.get("conditions") or (),
            self.conditions,
            meta.get("generation") or 0,
            self.now,
        )
        if self.status == (self.obj.get("status") or {}):
            return
        updated = await self.rt.kube.patch_status(
            KEYRINGS, self.name, self.status, resource_version=meta.get("resourceVersion")
        )
        self.rt.keyrings.put(updated)
        # The watch echo of our own write is absorbed by the store: fan out here instead.
        if matters_to_datakeys(self.obj, updated):
            self.rt.enqueue_datakeys_of(self.name)
        self.obj = updated
        self.status = dict(updated.get("status") or {})


def resolve_policy(rt: Runtime, spec: KeyRingSpec) -> tuple[RotationPolicySpec | None, str | None]:
    """The KeyRing's policy, or why it cannot be used."""
    if spec.policy_name is None:
        return None, None
    obj = rt.policies.get(None, spec.policy_name)
    if obj is None:
        return None, f"RotationPolicy {spec.policy_name} does not exist"
    try:
        return RotationPolicySpec.parse(obj.get("spec")), None
    except InvalidSpec as exc:
        return None, f"RotationPolicy {spec.policy_name} cannot be used: {exc}"


async def reconcile(rt: Runtime, name: str) -> float | None:
    obj = rt.keyrings.get(None, name)
    if obj is None:
        return None
    meta = obj["metadata"]
    deleting = bool(meta.get("deletionTimestamp"))
    finalizers = list(meta.get("finalizers") or ())
    if deleting and FINALIZER not in finalizers:
        return None
    if not deleting and FINALIZER not in finalizers:
        obj = await _set_finalizers(rt, obj, [*finalizers, FINALIZER])

    p = _Pass(rt, obj)
    try:
        spec = KeyRingSpec.parse(obj.get("spec"))
    except InvalidSpec as exc:
        # Nothing is provisioned, rotated or destroyed for a spec the operator cannot read;
        # deleting such a KeyRing keeps its keys in the HSM (as deletionPolicy Retain).
        if deleting:
            await _set_finalizers(rt, obj, [f for f in finalizers if f != FINALIZER])
            return None
        p.conditions.append(
            Condition("Ready", False, "InvalidSpec", f"The spec cannot be used: {exc}.")
        )
        await p.save()
        return None
    policy, policy_problem = resolve_policy(rt, spec)
    try:
        if not p.versions:
            await _provision(p)
        await _check_hsm(p)
        if not deleting:
            await _rotate_if_due(p, policy)
        restore, restore_request = await _restore_request(p)
        destroying = deleting and spec.deletion_policy is DeletionPolicy.DESTROY
        refs = await _references(rt, name, spec.allowed, fresh=False)
        plan = lifecycle.plan(
            p.versions, p.primary, policy, refs, p.now, deleting=destroying, restore=restore
        )
        if plan.actions:
            # Act only on what the API server says right now, not on the cache.
            refs = await _references(rt, name, spec.allowed, fresh=True)
            plan = lifecycle.plan(
                p.versions, p.primary, policy, refs, p.now, deleting=destroying, restore=restore
            )
            await _apply(p, plan.actions, policy)
        if restore_request is not None:
            p.status["lastRestoreRequest"] = restore_request
            await p.save()
        for version, why in plan.blocked:
            await rt.events.warning(
                p.obj, "RetirementBlocked", f"version {version} is not disabled: {why}"
            )
    except HsmError as exc:
        if exc.reason is Reason.KEY_NOT_TRUSTED:
            # Reachable, but the token holds a key object Kustody did not make (e.g. planted
            # by another user of a shared partition): nothing is adopted or used.
            p.conditions += [
                Condition("HSMReachable", True, "Reachable", "the HSM sidecar answers"),
                Condition("Ready", False, "KeyNotTrusted", exc.message),
            ]
            await p.save()
            await rt.events.warning(p.obj, "KeyNotTrusted", exc.message)
            return 60.0
        p.conditions += [
            Condition("HSMReachable", False, _camel(exc.reason), exc.message),
            Condition(
                "Ready", False, "HSMUnavailable", f"HSM sidecar: {exc.reason}: {exc.message}"
            ),
        ]
        await p.save()
        await rt.events.warning(p.obj, "HSMError", f"{exc.reason}: {exc.message}")
        raise
    except IntegrityError as exc:
        p.conditions += [
            Condition("HSMReachable", True, "Reachable", "the HSM sidecar answers"),
            Condition("Ready", False, exc.reason, exc.message),
        ]
        await p.save()
        await rt.events.warning(p.obj, exc.reason, exc.message)
        return 30.0

    if deleting:
        wait = await _finish_deletion(p, spec)
        return 1.0 if wait is not None and plan.actions else wait

    decision = decide(p.now, parse_time(p.status.get("lastRotationAt")), policy, None, None)
    refs = await _references(rt, name, spec.allowed, fresh=False)
    _summarise(p, spec, policy, policy_problem, refs, decision.next_at)
    await _escrow(p)
    await p.save()

    if plan.actions:
        # The plan was made before these steps: the next one (e.g. scheduling the destruction
        # of a version just disabled) may be due now. Look again rather than at the resync.
        return 1.0
    due = [t for t in (plan.next_due, decision.next_at) if t is not None]
    wait = min([(t - p.now).total_seconds() for t in due] + [RESYNC_SECONDS])
    return max(1.0, wait)


async def _escrow(p: _Pass) -> None:
    """spec.escrow: packages for every live version and admitted, allowed agent (see
    :mod:`kustody.controller.escrow.reconciler`); Events only when the Escrowed condition
    changes or a package was made."""
    before: Mapping[str, Any] = next(
        (c for c in p.status.get("conditions") or () if c.get("type") == "Escrowed"), {}
    )
    condition, events = await escrow.escrow_step(p.rt, p.obj, p.status, p.versions)
    if condition is None:
        return
    p.conditions.append(condition)
    changed = (before.get("reason"), before.get("message")) != (
        condition.reason,
        condition.message,
    )
    for reason, message in events:
        if reason == "EscrowExported":
            await p.rt.events.normal(p.obj, reason, message)
        elif changed:
            await p.rt.events.warning(p.obj, reason, message)
    if changed and not condition.status and condition.reason != "AgentRefused":
        await p.rt.events.warning(p.obj, condition.reason, condition.message)


async def _set_finalizers(
    rt: Runtime, obj: Mapping[str, Any], finalizers: list[str]
) -> Mapping[str, Any]:
    meta = obj["metadata"]
    patch = {"metadata": {"finalizers": finalizers, "resourceVersion": meta["resourceVersion"]}}
    updated = await rt.kube.patch(KEYRINGS, meta["name"], patch)
    rt.keyrings.put(updated)
    return updated


async def _provision(p: _Pass) -> None:
    """Create version 1, or adopt the versions the token already holds for this name."""
    described = await p.rt.call_hsm("DescribeKey", p.rt.hsm.describe_key(p.name))
    if described.versions:
        versions = [
            Version(i.ref.version, _TOKEN_STATE[i.state], p.now, i.fingerprint)
            for i in described.versions
        ]
        reason, message = (
            "Adopted",
            (
                f"adopted {len(versions)} existing version(s) from the HSM "
                f"(deletionPolicy Retain of an earlier KeyRing {p.name})"
            ),
        )
    else:
        info = await p.rt.call_hsm(
            "CreateKeyVersion", p.rt.hsm.create_key_version(p.name, 1, escrow=p.escrow)
        )
        versions = [Version(1, State.ENABLED, p.now, info.fingerprint)]
        reason, message = "Created", f"created KEK version 1 (fingerprint {info.fingerprint})"
    enabled = [v.version for v in versions if v.state is State.ENABLED]
    p.set_versions(versions)
    p.status["primaryVersion"] = max(enabled) if enabled else None
    p.status["lastRotationAt"] = format_time(p.now)
    p.conditions.append(Condition("HSMReachable", True, "Reachable", "the HSM sidecar answers"))
    await p.save()
    await p.rt.events.normal(p.obj, reason, message)


async def _check_hsm(p: _Pass) -> None:
    """The token must hold every live version with the fingerprint recorded at creation."""
    described = await p.rt.call_hsm("DescribeKey", p.rt.hsm.describe_key(p.name))
    token = {i.ref.version: i for i in described.versions}
    for v in p.versions:
        if v.state is State.DESTROYED:
            continue
        info = token.get(v.version)
        if info is None or info.state is VersionState.DESTROYED:
            raise IntegrityError(
                "KeyMaterialMissing",
                f"version {v.version} is not in the HSM token (was the token replaced?); "
                "nothing is rotated, disabled or destroyed until it is back",
            )
        if v.fingerprint and info.fingerprint != v.fingerprint:
            raise IntegrityError(
                "FingerprintMismatch",
                f"version {v.version} in the HSM has fingerprint {info.fingerprint}, "
                f"expected {v.fingerprint}; nothing is changed until this is resolved",
            )
        want = _WANT_TOKEN[v.state]
        if info.state is not want:
            await p.rt.call_hsm(
                "SetVersionState", p.rt.hsm.set_version_state(p.name, v.version, want)
            )
    p.conditions.append(Condition("HSMReachable", True, "Reachable", "the HSM sidecar answers"))


async def _rotate_if_due(p: _Pass, policy: RotationPolicySpec | None) -> None:
    annotations = p.obj["metadata"].get("annotations") or {}
    requested = annotations.get(ROTATE_ANNOTATION)
    decision = decide(
        p.now,
        parse_time(p.status.get("lastRotationAt")),
        policy,
        requested,
        p.status.get("lastRotationRequest"),
    )
    if not decision.due:
        return
    new = max((v.version for v in p.versions), default=0) + 1
    try:
        info = await p.rt.call_hsm(
            "CreateKeyVersion", p.rt.hsm.create_key_version(p.name, new, escrow=p.escrow)
        )
    except HsmError:
        p.rt.metrics.rotations.labels("failure").inc()
        raise
    p.set_versions([*p.versions, Version(new, State.ENABLED, p.now, info.fingerprint)])
    p.status.update(
        primaryVersion=new,
        lastRotationAt=format_time(p.now),
        lastRotationReason=decision.reason,
    )
    if decision.reason == "Requested":
        p.status["lastRotationRequest"] = requested
    await p.save()
    p.rt.metrics.rotations.labels("success").inc()
    await p.rt.events.normal(
        p.obj,
        "Rotated",
        f"version {new} is now primary ({decision.reason.lower()} rotation, "
        f"fingerprint {info.fingerprint})",
    )
    p.rt.enqueue_datakeys_of(p.name)


async def _restore_request(p: _Pass) -> tuple[frozenset[int], str | None]:
    """Versions a new ``kustody.io/restore-versions`` request asks to bring back."""
    value = (p.obj["metadata"].get("annotations") or {}).get(RESTORE_ANNOTATION)
    if not value or value == p.status.get("lastRestoreRequest"):
        return frozenset(), None
    try:
        return parse_restore_request(value), value
    except ValueError as exc:
        await p.rt.events.warning(p.obj, "InvalidRestoreRequest", f"{RESTORE_ANNOTATION}: {exc}")
        return frozenset(), value


async def _references(
    rt: Runtime, keyring: str, allowed: NamespaceSelector, *, fresh: bool
) -> References:
    """Which versions DataKeys still use: by their status and by their own Secret.

    Only DataKeys in namespaces the KeyRing allows count, and a Secret counts only as the
    Secret of such a DataKey (controlled by it, named by its status). A Secret that merely
    carries Kustody's labels is nobody's reference: a tenant cannot re-enable a version,
    hold off a destruction or block crypto-shredding with it.
    """
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
        namespace = str(dk["metadata"].get("namespace") or "")
        if not rt.namespace_allowed(allowed, namespace):
            continue
        status = dk.get("status") or {}
        generations = keyset.from_status(status, str(dk["metadata"].get("uid") or ""))
        versions = keyset.versions_in_use(generations)
        if v := status.get("keyRingVersion"):
            versions.add(int(v))
        secret = secrets.get((namespace, status_secret_name(dk) or ""))
        sv = _secret_version(secret) if secret is not None else None
        if secret is None or not is_datakey_secret(secret, dk):
            sv = None
        used.append((frozenset(versions), sv))
    return lifecycle.count_references(used)


def _secret_version(secret: Mapping[str, Any]) -> int | None:
    value = ((secret.get("metadata") or {}).get("labels") or {}).get(LABEL_VERSION)
    return int(value) if isinstance(value, str) and value.isdigit() else None


async def _apply(
    p: _Pass, actions: Sequence[lifecycle.Action], policy: RotationPolicySpec | None
) -> None:
    by_version = {v.version: v for v in p.versions}
    for action in actions:
        v = by_version[action.version]
        if action.kind is ActionKind.DISABLE:
            await p.rt.call_hsm(
                "SetVersionState",
                p.rt.hsm.set_version_state(p.name, v.version, VersionState.DISABLED),
            )
        elif action.kind is ActionKind.RESTORE:
            await p.rt.call_hsm(
                "SetVersionState",
                p.rt.hsm.set_version_state(p.name, v.version, VersionState.ENABLED),
            )
        elif action.kind is ActionKind.SCHEDULE_DESTROY:
            await p.rt.call_hsm(
                "SetVersionState",
                p.rt.hsm.set_version_state(p.name, v.version, VersionState.DESTROY_SCHEDULED),
            )
        elif action.kind is ActionKind.DESTROY:
            try:
                await p.rt.call_hsm("DestroyVersion", p.rt.hsm.destroy_version(p.name, v.version))
            except HsmError as exc:
                if exc.reason is not Reason.DESTRUCTION_NOT_DUE:
                    raise
                # The HSM's own waiting period is longer than the status says (e.g. the
                # schedule reached the token later): it wins; try again later.
                await p.rt.events.warning(p.obj, "DestructionNotDue", exc.message)
                continue
        new = lifecycle.apply(v, action, p.now, policy)
        by_version[v.version] = new
        p.set_versions(list(by_version.values()))
        await p.save()
        p.rt.metrics.lifecycle.labels(str(new.state)).inc()
        await _announce(p, action, new)


async def _announce(p: _Pass, action: lifecycle.Action, v: Version) -> None:
    if action.kind is ActionKind.DISABLE:
        await p.rt.events.normal(
            p.obj,
            "Disabled",
            f"version {v.version} disabled ({action.reason}); it no longer decrypts",
        )
    elif action.kind is ActionKind.SCHEDULE_DESTROY:
        when = format_time(v.destroy_at) if v.destroy_at else "?"
        await p.rt.events.warning(
            p.obj,
            "DestroyScheduled",
            f"version {v.version} will be destroyed at {when}; restore it before then to keep it",
        )
    elif action.kind is ActionKind.DESTROY:
        await p.rt.events.warning(
            p.obj, "Destroyed", f"version {v.version} destroyed in the HSM (irreversible)"
        )
    else:
        await p.rt.events.warning(
            p.obj, "Restored", f"version {v.version} enabled again: {action.reason}"
        )


async def _finish_deletion(p: _Pass, spec: KeyRingSpec) -> float | None:
    pending = [v for v in p.versions if v.state is not State.DESTROYED]
    if spec.deletion_policy is DeletionPolicy.RETAIN or not pending:
        meta = p.obj["metadata"]
        remaining = [f for f in meta.get("finalizers") or () if f != FINALIZER]
        await _set_finalizers(p.rt, p.obj, remaining)
        return None
    waits = [v.destroy_at for v in pending if v.destroy_at is not None]
    message = f"deletionPolicy Destroy: waiting for {len(pending)} version(s) to be destroyed"
    if waits:
        message += f"; the last at {format_time(max(waits))}"
    p.conditions.append(Condition("Ready", False, "Deleting", message))
    await p.save()
    due = min(waits) if waits else p.now + dt.timedelta(seconds=RESYNC_SECONDS)
    return max(1.0, min(RESYNC_SECONDS, (due - p.now).total_seconds()))


def _summarise(
    p: _Pass,
    spec: KeyRingSpec,
    policy: RotationPolicySpec | None,
    policy_problem: str | None,
    refs: References,
    next_at: dt.datetime | None,
) -> None:
    p.set_versions([replace(v, data_keys=refs.data_keys.get(v.version, 0)) for v in p.versions])
    p.status["destructionImpact"] = lifecycle.destruction_impact(p.versions, refs)
    if next_at is not None:
        p.status["nextRotationAt"] = format_time(next_at)
    else:
        p.status.pop("nextRotationAt", None)
    primary = p.primary
    datakeys = p.rt.datakeys.by_index(p.name)
    behind = sum(
        1
        for d in datakeys
        if any(
            v != primary
            for v in keyset.versions_in_use(
                keyset.from_status(d.get("status") or {}, str(d["metadata"].get("uid") or ""))
            )
        )
    )
    manual = policy is not None and policy.rewrap is Rewrap.MANUAL
    if behind and not manual:
        rotating = Condition(
            "Rotating",
            True,
            "Rewrapping",
            f"{behind} of {len(datakeys)} DataKeys still wrapped under older versions",
        )
    elif behind:
        rotating = Condition(
            "Rotating",
            False,
            "ManualRewrap",
            f"{behind} DataKeys wrapped under older versions (rewrap: Manual)",
        )
    else:
        rotating = Condition("Rotating", False, "UpToDate", f"every DataKey uses version {primary}")
    enabled = sum(1 for v in p.versions if v.state is State.ENABLED)
    if policy_problem:
        ready = Condition("Ready", False, "RotationPolicyNotFound", policy_problem)
    else:
        ready = Condition(
            "Ready",
            True,
            "Ready",
            f"primary version {primary}; {enabled} of {len(p.versions)} versions enabled",
        )
    p.conditions += [rotating, ready]


def _camel(reason: str) -> str:
    return "".join(part.capitalize() for part in reason.split("_"))
