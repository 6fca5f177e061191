"""Deletion: the finalizer, and what ``deletionPolicy`` asks before it is removed."""

from __future__ import annotations

import datetime as dt

from kustody.controller.keyring.state import FINALIZER, RESYNC_SECONDS, KeyRingPass
from kustody.domain.conditions import Condition
from kustody.domain.lifecycle import State
from kustody.domain.specs import DeletionPolicy, KeyRingSpec
from kustody.domain.timestamps import format_time


async def ensure_finalizer(p: KeyRingPass) -> bool:
    """Add the finalizer to a live KeyRing; False when a deleting KeyRing no longer has it
    (nothing left to do)."""
    if FINALIZER in p.meta.finalizers:
        return True
    if p.meta.deleting:
        return False
    await p.set_finalizers([*p.meta.finalizers, FINALIZER])
    return True


async def release(p: KeyRingPass) -> None:
    """Remove the finalizer: the API server may delete the KeyRing now."""
    await p.set_finalizers([f for f in p.meta.finalizers if f != FINALIZER])


async def finish(p: KeyRingPass, spec: KeyRingSpec) -> float | None:
    """Retain: release at once. Destroy: release once every version is destroyed; until
    then say what is pending and come back when the next destruction is due."""
    pending = [v for v in p.versions if v.state is not State.DESTROYED]
    if spec.deletion_policy is DeletionPolicy.RETAIN or not pending:
        await release(p)
        return None
    waits = [v.destroy_at for v in pending if v.destroy_at is not None]
    message = f"deletionPolicy Destroy: waiting for {len(pending)} version(s) to be destroyed"
    if waits:
        message += f"; the last at {format_time(max(waits))}"
    p.conditions.append(Condition("Ready", False, "Deleting", message))
    await p.save()
    due = min(waits) if waits else p.now + dt.timedelta(seconds=RESYNC_SECONDS)
    return max(1.0, min(RESYNC_SECONDS, (due - p.now).total_seconds()))
