"""The KeyRing's summary: references per version, destruction impact, next rotation, and
the Rotating and Ready conditions."""

from __future__ import annotations

import datetime as dt
from dataclasses import replace

from kustody.controller.keyring.state import KeyRingPass
from kustody.domain import lifecycle
from kustody.domain.conditions import Condition
from kustody.domain.lifecycle import References, State
from kustody.domain.specs import Rewrap, RotationPolicySpec
from kustody.domain.timestamps import format_time


def summarise(
    p: KeyRingPass,
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
    manual = policy is not None and policy.rewrap is Rewrap.MANUAL
    p.conditions += [_rotating(p, manual), _ready(p, policy_problem)]


def _rotating(p: KeyRingPass, manual: bool) -> Condition:
    primary = p.primary
    datakeys = p.rt.datakeys.by_index(p.name)
    behind = sum(1 for d in datakeys if any(v != primary for v in p.rt.wrapping_versions(d)))
    if behind and not manual:
        return Condition(
            "Rotating",
            True,
            "Rewrapping",
            f"{behind} of {len(datakeys)} DataKeys still wrapped under older versions",
        )
    if behind:
        return Condition(
            "Rotating",
            False,
            "ManualRewrap",
            f"{behind} DataKeys wrapped under older versions (rewrap: Manual)",
        )
    return Condition("Rotating", False, "UpToDate", f"every DataKey uses version {primary}")


def _ready(p: KeyRingPass, policy_problem: str | None) -> Condition:
    if policy_problem:
        return Condition("Ready", False, "RotationPolicyNotFound", policy_problem)
    enabled = sum(1 for v in p.versions if v.state is State.ENABLED)
    return Condition(
        "Ready",
        True,
        "Ready",
        f"primary version {p.primary}; {enabled} of {len(p.versions)} versions enabled",
    )
