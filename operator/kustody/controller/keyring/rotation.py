"""Rotation: a new KEK version becomes primary when a request or the RotationPolicy says so."""

from __future__ import annotations

import datetime as dt

from kustody.api.client import HsmError
from kustody.controller.keyring.state import KeyRingPass
from kustody.domain.lifecycle import State, Version
from kustody.domain.rotation import decide
from kustody.domain.specs import ROTATE_ANNOTATION, RotationPolicySpec
from kustody.domain.timestamps import format_time, parse_time


async def rotate_if_due(p: KeyRingPass, policy: RotationPolicySpec | None) -> dt.datetime | None:
    """Rotate if a new ``kustody.io/rotate`` request or the schedule says so; returns when
    the next scheduled rotation is (None: no schedule)."""
    requested = p.meta.annotations.get(ROTATE_ANNOTATION)
    decision = decide(
        p.now,
        parse_time(p.status.get("lastRotationAt")),
        policy,
        requested,
        p.status.get("lastRotationRequest"),
    )
    if not decision.due:
        return decision.next_at
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
        primaryVersion=new, lastRotationAt=format_time(p.now), lastRotationReason=decision.reason
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
    return next_rotation_at(p, policy)


def next_rotation_at(p: KeyRingPass, policy: RotationPolicySpec | None) -> dt.datetime | None:
    """When the schedule rotates next, from the status's lastRotationAt."""
    return decide(p.now, parse_time(p.status.get("lastRotationAt")), policy, None, None).next_at
