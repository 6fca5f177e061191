"""Whether a KeyRing should rotate now: on schedule or on request."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from kustody.domain.schedule import in_window, next_rotation, next_window_start
from kustody.domain.specs import RotationPolicySpec


@dataclass(frozen=True)
class RotationDecision:
    due: bool
    reason: str  # "Requested" | "Scheduled" | ""
    next_at: dt.datetime | None


def decide(
    now: dt.datetime,
    last_rotation: dt.datetime | None,
    policy: RotationPolicySpec | None,
    requested: str | None,
    handled_request: str | None,
) -> RotationDecision:
    """A request (the annotation's value, new since the last handled one) rotates at once,
    without waiting for a window; a schedule rotates at lastRotationAt + rotationPeriod,
    moved into the maintenance window."""
    next_at = (
        next_rotation(last_rotation, policy.rotation_period, policy.window)
        if policy is not None and last_rotation is not None
        else None
    )
    if requested and requested != handled_request:
        return RotationDecision(True, "Requested", next_at)
    if policy is not None and next_at is not None and now >= next_at:
        if in_window(policy.window, now):
            return RotationDecision(True, "Scheduled", next_at)
        # Overdue but the window has closed since (e.g. the operator was down): wait for the next.
        next_at = next_window_start(policy.window, now)
    return RotationDecision(False, "", next_at)
