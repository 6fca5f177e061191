"""The escrow step of a KeyRing with ``spec.escrow``: packages for every live version and
admitted, allowed agent (the export itself is :mod:`kustody.controller.escrow.reconciler`).
Events only when the Escrowed condition changes or a package was made."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kustody.controller.escrow import reconciler as escrow
from kustody.controller.keyring.state import KeyRingPass


async def escrow_step(p: KeyRingPass) -> None:
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
