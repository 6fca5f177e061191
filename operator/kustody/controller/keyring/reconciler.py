"""KeyRing reconciler: a short sequence of concerns, each in its own module.

finalizer (deletion) → provisioning and integrity (provisioning) → rotation → restore and
retirement (retirement, on references) → deletion or summary and escrow. Each pass
recomputes what is due from the KeyRing's status, its RotationPolicy, what references each
version, and the clock (``domain.lifecycle.plan``), then makes the HSM match. Every HSM call
is idempotent (deterministic version objects), and the status is written right after each
change with the object's resourceVersion, so a crash or a stale view repeats at most an
idempotent step.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple

from kustody.api.client import HsmError, Reason
from kustody.controller.keyring import deletion, provisioning, retirement, rotation
from kustody.controller.keyring.escrow import escrow_step
from kustody.controller.keyring.references import references
from kustody.controller.keyring.state import (
    FINALIZER,
    REACHABLE,
    RESYNC_SECONDS,
    IntegrityError,
    KeyRingPass,
    camel,
)
from kustody.controller.keyring.summary import summarise
from kustody.controller.runtime import Runtime
from kustody.domain import lifecycle
from kustody.domain.conditions import Condition
from kustody.domain.errors import InvalidSpec
from kustody.domain.specs import DeletionPolicy, KeyRingSpec, RotationPolicySpec

__all__ = ["FINALIZER", "RESYNC_SECONDS", "reconcile", "resolve_policy"]

NOT_DUE_RETRY_SECONDS = RESYNC_SECONDS


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
    """One pass; returns when to look again (None: only when something changes)."""
    obj = rt.keyrings.get(None, name)
    if obj is None:
        return None
    try:
        spec = KeyRingSpec.parse(obj.get("spec"))
    except InvalidSpec as exc:
        await _invalid_spec(KeyRingPass(rt, obj), exc)
        return None
    p = KeyRingPass(rt, obj, escrow=spec.escrow)
    if not await deletion.ensure_finalizer(p):
        return None
    try:
        return await _converge(p, spec)
    except HsmError as exc:
        return await _hsm_failed(p, exc)
    except IntegrityError as exc:
        p.conditions += [REACHABLE, Condition("Ready", False, exc.reason, exc.message)]
        await p.save()
        await rt.events.warning(p.obj, exc.reason, exc.message)
        return 30.0


async def _converge(p: KeyRingPass, spec: KeyRingSpec) -> float | None:
    policy, policy_problem = resolve_policy(p.rt, spec)
    described = await provisioning.describe(p)
    if p.versions:
        await provisioning.check_token(p, described)
    else:
        await provisioning.provision(p, described)
    next_rotation = None if p.meta.deleting else await rotation.rotate_if_due(p, policy)
    retired = await _retire(p, spec, policy)
    if p.meta.deleting:
        wait = await deletion.finish(p, spec)
        return 1.0 if wait is not None and retired.acted else wait
    summarise(p, policy, policy_problem, retired.refs, next_rotation)
    await escrow_step(p)
    await p.save()
    if retired.acted:
        # The plan was made before these steps: the next one (e.g. scheduling the destruction
        # of a version just disabled) may be due now. Look again rather than at the resync.
        return 1.0
    due = [t for t in (retired.next_due, next_rotation) if t is not None]
    wait = min([(t - p.now).total_seconds() for t in due] + [RESYNC_SECONDS])
    return max(1.0, wait)


class _Retired(NamedTuple):
    acted: bool  # some step was taken
    refs: lifecycle.References  # the references the last plan was made on
    next_due: dt.datetime | None  # when the next step falls due


async def _retire(p: KeyRingPass, spec: KeyRingSpec, policy: RotationPolicySpec | None) -> _Retired:
    """Plan on the cached references; act only on a plan made from what the API server says
    right now."""
    restore, restore_request = await retirement.restore_request(p)
    destroying = p.meta.deleting and spec.deletion_policy is DeletionPolicy.DESTROY

    def plan(refs: lifecycle.References) -> lifecycle.Plan:
        return lifecycle.plan(
            p.versions, p.primary, policy, refs, p.now, deleting=destroying, restore=restore
        )

    refs = await references(p.rt, p.name, spec.allowed, fresh=False)
    planned = plan(refs)
    taken = refused = 0
    if planned.actions:
        refs = await references(p.rt, p.name, spec.allowed, fresh=True)
        planned = plan(refs)
        taken, refused = await retirement.apply(p, planned.actions, policy)
    if restore_request is not None:
        p.status["lastRestoreRequest"] = restore_request
        await p.save()
    for version, why in planned.blocked:
        await p.rt.events.warning(
            p.obj, "RetirementBlocked", f"version {version} is not disabled: {why}"
        )
    # A destruction the token refused as not due yet (its own waiting period is longer than
    # the status says) is tried again at the resync, not at once.
    next_due = p.now + dt.timedelta(seconds=NOT_DUE_RETRY_SECONDS) if refused else planned.next_due
    return _Retired(taken > 0, refs, next_due)


async def _invalid_spec(p: KeyRingPass, exc: InvalidSpec) -> None:
    """Nothing is provisioned, rotated or destroyed for a spec the operator cannot read;
    deleting such a KeyRing keeps its keys in the HSM (as deletionPolicy Retain)."""
    if p.meta.deleting:
        if FINALIZER in p.meta.finalizers:
            await deletion.release(p)
        return
    if FINALIZER not in p.meta.finalizers:
        await deletion.ensure_finalizer(p)
    p.conditions.append(
        Condition("Ready", False, "InvalidSpec", f"The spec cannot be used: {exc}.")
    )
    await p.save()
    return None


async def _hsm_failed(p: KeyRingPass, exc: HsmError) -> float:
    if exc.reason is Reason.KEY_NOT_TRUSTED:
        # Reachable, but the token holds a key object Kustody did not make (e.g. planted by
        # another user of a shared partition): nothing is adopted or used.
        p.conditions += [REACHABLE, Condition("Ready", False, "KeyNotTrusted", exc.message)]
        await p.save()
        await p.rt.events.warning(p.obj, "KeyNotTrusted", exc.message)
        return 60.0
    p.conditions += [
        Condition("HSMReachable", False, camel(exc.reason), exc.message),
        Condition("Ready", False, "HSMUnavailable", f"HSM sidecar: {exc.reason}: {exc.message}"),
    ]
    await p.save()
    await p.rt.events.warning(p.obj, "HSMError", f"{exc.reason}: {exc.message}")
    raise exc
