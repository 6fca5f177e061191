"""Retirement: disable, schedule destruction, destroy and restore KEK versions.

``domain.lifecycle.plan`` decides from the versions, the policy, the references and the
clock; this module makes the token match, one idempotent step at a time, writing the status
after each.
"""

from __future__ import annotations

from collections.abc import Sequence

from kustody.api.client import HsmError, Reason, VersionState
from kustody.controller.keyring.state import KeyRingPass
from kustody.domain import lifecycle
from kustody.domain.lifecycle import ActionKind, Version
from kustody.domain.specs import RESTORE_ANNOTATION, RotationPolicySpec, parse_restore_request
from kustody.domain.timestamps import format_time

_SET_STATE = {
    ActionKind.DISABLE: VersionState.DISABLED,
    ActionKind.RESTORE: VersionState.ENABLED,
    ActionKind.SCHEDULE_DESTROY: VersionState.DESTROY_SCHEDULED,
}


async def restore_request(p: KeyRingPass) -> tuple[frozenset[int], str | None]:
    """Versions a new ``kustody.io/restore-versions`` request asks to bring back, and the
    request (to record as handled)."""
    value = p.meta.annotations.get(RESTORE_ANNOTATION)
    if not value or value == p.status.get("lastRestoreRequest"):
        return frozenset(), None
    try:
        return parse_restore_request(value), value
    except ValueError as exc:
        await p.rt.events.warning(p.obj, "InvalidRestoreRequest", f"{RESTORE_ANNOTATION}: {exc}")
        return frozenset(), value


async def apply(
    p: KeyRingPass, actions: Sequence[lifecycle.Action], policy: RotationPolicySpec | None
) -> tuple[int, int]:
    """Take the steps; returns (steps taken, destructions the token said are not due yet)."""
    by_version = {v.version: v for v in p.versions}
    taken = refused = 0
    for action in actions:
        v = by_version[action.version]
        if not await _in_token(p, action, v):
            refused += 1
            continue
        taken += 1
        new = lifecycle.apply(v, action, p.now, policy)
        by_version[v.version] = new
        p.set_versions(list(by_version.values()))
        await p.save()
        p.rt.metrics.lifecycle.labels(str(new.state)).inc()
        await _announce(p, action, new)
    return taken, refused


async def _in_token(p: KeyRingPass, action: lifecycle.Action, v: Version) -> bool:
    """Make the token take the step; False when the token says it is not due yet."""
    if action.kind is not ActionKind.DESTROY:
        state = _SET_STATE[action.kind]
        await p.rt.call_hsm("SetVersionState", p.rt.hsm.set_version_state(p.name, v.version, state))
        return True
    try:
        await p.rt.call_hsm("DestroyVersion", p.rt.hsm.destroy_version(p.name, v.version))
    except HsmError as exc:
        if exc.reason is not Reason.DESTRUCTION_NOT_DUE:
            raise
        # The HSM's own waiting period is longer than the status says (e.g. the schedule
        # reached the token later): it wins; try again later.
        await p.rt.events.warning(p.obj, "DestructionNotDue", exc.message)
        return False
    return True


async def _announce(p: KeyRingPass, action: lifecycle.Action, v: Version) -> None:
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
