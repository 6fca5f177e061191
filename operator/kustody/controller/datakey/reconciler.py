"""DataKey reconciler: one DEK (in generations) per DataKey, published only wrapped in the
DataKey's Secret. A short sequence of concerns, each in its own module: the KeyRing may be
used (keyring), the Secret may be taken over (adoption), the generations are made, re-wrapped
and retained (generations), the Secret is written (secret), workloads restart (restarts).

Order of writes, chosen so that a crash at any line loses nothing:
1. new key material or a re-wrap is recorded in the DataKey's status first (the source of
   truth, written with the object's resourceVersion so a stale view cannot overwrite it);
2. then the Secret is created or brought in line with the status;
3. then Ready, and rollout restarts, which are idempotent per DEK generation.
A rerun after a crash finds the status and finishes steps 2 and 3; it never generates twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kustody.api.client import HsmError
from kustody.controller.datakey import adoption, generations, secret
from kustody.controller.datakey.keyring import check_keyring, envelope_problem
from kustody.controller.datakey.restarts import restart_targets
from kustody.controller.datakey.state import DataKeyPass, NotReady, set_not_ready
from kustody.controller.runtime import KEYRING, Runtime
from kustody.domain import keyset
from kustody.domain.conditions import Condition, merge
from kustody.domain.errors import InvalidSpec
from kustody.domain.objects import ObjectMeta
from kustody.domain.secret import SecretContent
from kustody.domain.specs import DataKeySpec
from kustody.kube.errors import Conflict, KubeError, Unavailable


async def reconcile(rt: Runtime, namespace: str, name: str) -> float | None:
    """One pass; returns seconds until the next pass is needed (None: only on change)."""
    obj = rt.datakeys.get(namespace, name)
    if obj is None or ObjectMeta.of(obj).deleting:
        return None  # the Secret goes with it (ownerReference → garbage collector)
    try:
        spec = DataKeySpec.parse(obj.get("spec"))
    except InvalidSpec as exc:
        await set_not_ready(rt, obj, "InvalidSpec", f"The spec cannot be used: {exc}.")
        return None
    try:
        keyring = check_keyring(rt, namespace, spec)
    except NotReady as exc:
        if exc.revokes_plaintext:
            await secret.withdraw_plaintext(rt, obj, spec)
        await set_not_ready(rt, obj, exc.reason, exc.message)
        return None
    p = DataKeyPass(rt, obj, spec, keyring, rt.clock())
    try:
        return await _converge(p)
    except NotReady as exc:
        await set_not_ready(rt, p.obj, exc.reason, exc.message)
        return None


async def _converge(p: DataKeyPass) -> float | None:
    live = await secret.live_secret(p.rt, p.meta, p.spec.secret_name)
    found = None
    if live is not None and not secret.owned_by(live, p.meta.uid):
        found = adoption.adoptable(p, live)
    for g in p.generations:
        if problem := envelope_problem(g.wrapped, p.spec.key_ring):
            raise NotReady("EnvelopeMismatch", problem)
    await _keys(p, found, had_secret=live is not None)
    next_removal = generations.retain(p)
    content = await secret.desired(p)
    await _record(p)
    await _publish(p, live, content, adopt=found is not None)
    await _ready(p)
    regenerate_at = generations.regeneration_due(p.spec, p.status)
    due = [t for t in (next_removal, regenerate_at) if t is not None]
    return max(1.0, (min(due) - p.now).total_seconds()) if due else None


async def _keys(p: DataKeyPass, found: list[keyset.Generation] | None, *, had_secret: bool) -> None:
    """Adopt, generate when due, re-wrap when allowed. An HSM failure leaves a DataKey that
    already has a published key Ready (its key still works) and says so in an Event."""
    try:
        if found is not None and not p.generations:
            await adoption.adopt(p, found)
        await generations.generate_if_due(p)
        if generations.rewrap_allowed(p):
            await generations.rewrap(p)
    except HsmError as exc:
        message = f"HSM sidecar: {exc.reason}: {exc.message}"
        await p.rt.events.warning(p.obj, "HSMError", message)
        if not (p.generations and had_secret):
            await set_not_ready(p.rt, p.obj, "HSMUnavailable", message)
        raise


async def _record(p: DataKeyPass) -> None:
    """1. The key material goes into the status first: it is the record everything else is
    restored from, so a crash after this loses nothing."""
    current = keyset.primary(p.generations)
    assert current is not None  # generate_if_due made one
    p.status.update(
        generations=keyset.to_status(p.generations),
        wrappedKey=current.wrapped,
        keyRingVersion=current.version,
        dekGeneration=current.generation,
        secretRef={"name": p.spec.secret_name},
        observedGeneration=p.meta.generation or None,
    )
    if await p.write_status(p.status):
        ring = p.spec.key_ring  # its references and Rotating condition
        p.rt.enqueue(KEYRING, None, ring, delay=p.rt.keyring_delay(ring))
    await p.flush_events()


async def _publish(
    p: DataKeyPass, live: Mapping[str, Any] | None, content: SecretContent, *, adopt: bool
) -> None:
    """2. Then the Secret. A write the API server refuses makes the DataKey not Ready."""
    try:
        restored = await secret.publish(p, live, content, adopt=adopt)
    except (Conflict, Unavailable):
        raise  # looked at again shortly (a newer object is on its way, or the API is down)
    except KubeError as exc:
        p.rt.metrics.secret_write_failures.inc()
        await set_not_ready(
            p.rt,
            p.obj,
            "SecretWriteFailed",
            f"Secret {p.spec.secret_name} could not be written: {exc.message or exc.reason}",
        )
        raise
    if restored and not adopt and not p.events:
        # Only a pass that changed no key material writes the Secret because someone else
        # had edited it (after a re-wrap or a regeneration the new content is ours).
        await p.rt.events.warning(
            p.obj, "SecretRestored", f"Secret {p.spec.secret_name} was edited; restored"
        )


async def _ready(p: DataKeyPass) -> None:
    """3. Only now, with the Secret written and its response checked, Ready. (The version is
    in status.keyRingVersion; leaving it out of the message spares a write per re-wrap.)"""
    current = keyset.primary(p.generations)
    assert current is not None
    count = len(p.generations)
    ready = Condition(
        "Ready",
        True,
        "KeyAvailable",
        f"Secret {p.spec.secret_name} holds the data key (generation {current.generation}"
        f"{f', {count} generations in the keyset' if count > 1 else ''}) wrapped under "
        f"KeyRing {p.spec.key_ring}",
    )
    done = dict(p.obj.get("status") or {})
    done["conditions"] = merge(done.get("conditions") or (), [ready], p.meta.generation, p.now)
    await p.write_status(done)
    if current.generation >= 2:
        await restart_targets(p, current.generation)
