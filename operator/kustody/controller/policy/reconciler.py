"""RotationPolicy reconciler: validity and how many KeyRings use the policy."""

from __future__ import annotations

import contextlib

from kustody.controller.runtime import Runtime
from kustody.domain.conditions import Condition, merge
from kustody.domain.duration import format_duration
from kustody.domain.errors import InvalidSpec
from kustody.domain.specs import RotationPolicySpec
from kustody.kube.errors import NotFound
from kustody.kube.resources import ROTATION_POLICIES


async def reconcile(rt: Runtime, name: str) -> float | None:
    obj = rt.policies.get(None, name)
    if obj is None:
        return None
    meta = obj["metadata"]
    try:
        spec = RotationPolicySpec.parse(obj.get("spec"))
        ready = Condition(
            "Ready",
            True,
            "Valid",
            f"rotates every {format_duration(spec.rotation_period)}, "
            f"destroys after {format_duration(spec.destroy_after)}, rewrap {spec.rewrap}",
        )
    except InvalidSpec as exc:
        ready = Condition("Ready", False, "InvalidSpec", f"The spec cannot be used: {exc}.")
    status = dict(obj.get("status") or {})
    status["keyRings"] = len(rt.keyrings.by_index(name))
    status["observedGeneration"] = meta.get("generation")
    status["conditions"] = merge(
        status.get("conditions") or (), [ready], meta.get("generation") or 0, rt.clock()
    )
    if status != (obj.get("status") or {}):
        with contextlib.suppress(NotFound):
            rt.policies.put(await rt.kube.patch_status(ROTATION_POLICIES, name, status))
    return None
