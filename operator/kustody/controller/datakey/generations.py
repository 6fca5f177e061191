"""The DEK's generations: made when there is none or when due, re-wrapped after a KeyRing
rotation (same DEKs), and removed only as ``spec.retention`` asks (see docs/runbooks/
regeneration.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from kustody.api.client import GenerateItem
from kustody.controller.datakey.state import DataKeyPass
from kustody.domain import keyset
from kustody.domain.errors import DomainError
from kustody.domain.schedule import in_window
from kustody.domain.specs import REWRAP_ANNOTATION, DataKeySpec, Rewrap, RotationPolicySpec
from kustody.domain.timestamps import format_time, parse_time


def regeneration_due(spec: DataKeySpec, status: Mapping[str, Any]) -> dt.datetime | None:
    generated = parse_time(status.get("lastGeneratedAt"))
    if spec.regenerate_after is None or generated is None:
        return None
    return generated + spec.regenerate_after


async def generate_if_due(p: DataKeyPass) -> None:
    """New key material when there is none, on a new regenerate request, or when
    regenerateAfter has passed. The earlier generations stay in the keyset, decrypt-only."""
    spec = p.spec
    due = regeneration_due(spec, p.status)
    requested = p.meta.annotations.get(keyset.REGENERATE_ANNOTATION)
    asked = bool(requested) and requested != p.status.get("lastRegenerateRequest")
    if p.generations and not asked and (due is None or p.now < due):
        return
    key = await p.rt.generate(
        GenerateItem(spec.key_ring, p.binding, version=p.keyring.primary, length=spec.length)
    )
    p.generations = keyset.add_generation(
        p.generations, uid=p.meta.uid, wrapped=key.wrapped, version=key.version, now=p.now
    )
    p.status["lastGeneratedAt"] = format_time(p.now)
    if asked:
        p.status["lastRegenerateRequest"] = requested
    p.rt.metrics.generations.inc()
    new = keyset.primary(p.generations)
    assert new is not None
    if new.generation == 1:
        p.note(
            "Created",
            f"generated data key (generation 1, key id {new.key_id:08x}) under "
            f"{spec.key_ring} v{key.version}",
        )
        return
    p.note(
        "Regenerated",
        f"generated new data key material (generation {new.generation}, key id "
        f"{new.key_id:08x}) {'on request' if asked else 'after regenerateAfter'}, under "
        f"{spec.key_ring} v{key.version}; "
        f"generation {new.generation - 1} stays in the keyset, decrypt-only",
    )


def rewrap_allowed(p: DataKeyPass) -> bool:
    """``kustody rewrap KEYRING``: DataKeys not re-wrapped since the request move now, even
    under rewrap: Manual and outside the maintenance window (it is a deliberate act).
    Otherwise the KeyRing's RotationPolicy says when."""
    last_rewrap = parse_time(p.status.get("lastRewrapAt"))
    asked = parse_time(p.keyring.meta.annotations.get(REWRAP_ANNOTATION))
    if asked is not None and (last_rewrap is None or last_rewrap < asked):
        return True
    policy = _policy(p)
    if policy is not None and policy.rewrap is Rewrap.MANUAL:
        return False
    if policy is None or policy.window is None:
        return True
    requested = (p.keyring.obj.get("status") or {}).get("lastRotationReason") == "Requested"
    return requested or in_window(policy.window, p.now)


def _policy(p: DataKeyPass) -> RotationPolicySpec | None:
    name = p.keyring.spec.policy_name
    obj = p.rt.policies.get(None, name) if name is not None else None
    if obj is None:
        return None
    try:
        return RotationPolicySpec.parse(obj.get("spec") or {})
    except (DomainError, KeyError, ValueError):
        return None


async def rewrap(p: DataKeyPass) -> None:
    """A KeyRing rotation re-wraps every generation still in the keyset (same DEKs)."""
    primary = p.keyring.primary
    stale = [g for g in p.generations if g.version != primary]
    if not stale:
        return
    moved = await asyncio.gather(*(p.rt.rewrap(g.wrapped, p.binding, primary) for g in stale))
    by_generation = {g.generation: m for g, m in zip(stale, moved, strict=True)}
    p.generations = [
        replace(g, wrapped=m.wrapped, version=m.to_version)
        if (m := by_generation.get(g.generation)) is not None
        else g
        for g in p.generations
    ]
    p.status["lastRewrapAt"] = format_time(p.now)
    p.rt.metrics.rewraps.inc()
    old = sorted({g.version for g in stale})
    p.note(
        "Rewrapped",
        f"re-wrapped {len(stale)} generation(s) from {p.spec.key_ring} "
        f"v{','.join(map(str, old))} to v{primary}",
    )


def retain(p: DataKeyPass) -> dt.datetime | None:
    """Staged removal of decrypt-only generations, only as spec.retention asks; returns
    when the next step is due."""
    kept = keyset.parse_keep(p.meta.annotations.get(keyset.KEEP_ANNOTATION))
    p.generations, changes, due = keyset.plan_retention(
        p.generations, p.spec.retention, kept, p.now
    )
    for change in changes:
        g = change.generation
        if change.kind == "RemovalScheduled":
            when = format_time(g.remove_at) if g.remove_at else "?"
            p.note(
                "GenerationRemovalScheduled",
                f"generation {g.generation} (key id {g.key_id:08x}) will be removed from the "
                f"keyset at {when} (spec.retention); data encrypted under it becomes "
                f"unreadable then. To keep it: kustody datakey keep "
                f"{p.namespace}/{p.name} {g.generation}",
                warning=True,
            )
        elif change.kind == "RemovalCancelled":
            p.note(
                "GenerationRemovalCancelled",
                f"generation {g.generation} (key id {g.key_id:08x}) stays in the keyset",
            )
        else:
            p.rt.metrics.generations_removed.inc()
            p.note(
                "GenerationRemoved",
                f"generation {g.generation} (key id {g.key_id:08x}) removed from the keyset "
                "(its waiting period ended); data encrypted under it can no longer be "
                "decrypted",
                warning=True,
            )
    return due
