"""Escrow: EscrowAgent status, and the escrow step of an escrowed KeyRing's reconcile pass.

An EscrowAgent's status says its key fingerprint and whether the token trusts its key (the
sidecar looks; only the Security Officer can make it so). For a KeyRing with ``spec.escrow``,
each pass makes sure every live, escrowable version has a package for every agent that may
have one: agents outside ``allowedJurisdictions`` or not admitted are refused (condition
``Escrowed=False`` naming each and why), versions created before escrow was switched on are
reported (``VersionNotEscrowable``: rotate). A package is made inside the token (ExportEscrow),
stored as a Secret in the operator namespace, and recorded: KeyRing ``status.escrowExports``
(version, agent, package fingerprint, time), an Event, the sidecar's audit line and the
metric ``kustody_escrow_exports_total``. A package already recorded, or already stored (a crash
between the two), is never made again: re-export is idempotent.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kustody.api.client import HsmError, Reason
from kustody.controller.runtime import Runtime
from kustody.domain.conditions import Condition, merge
from kustody.domain.escrow import (
    EscrowError,
    EscrowSpec,
    Package,
    Refusal,
    package_secret_name,
    parse_public_key,
    refusals,
)
from kustody.domain.lifecycle import State, Version
from kustody.domain.secret import LABEL_KEYRING, LABEL_VERSION, MANAGED_BY, MANAGER
from kustody.domain.timestamps import format_time
from kustody.kube.errors import Conflict, NotFound
from kustody.kube.resources import ESCROW_AGENTS, SECRETS

LABEL_AGENT = "kustody.io/escrow-agent"
LABEL_PACKAGE = "kustody.io/escrow-package"
PACKAGE_KEY = "package.json"
PACKAGE_SECRET_TYPE = "kustody.io/escrow-package"  # noqa: S105 - a Secret type
AGENT_RESYNC_SECONDS = 30.0  # admission happens outside the cluster: look again this often


async def reconcile_agent(rt: Runtime, name: str) -> float | None:
    obj = rt.escrow_agents.get(None, name)
    if obj is None:
        return None
    status: dict[str, Any] = dict(obj.get("status") or {})
    try:
        agent = parse_public_key(str((obj.get("spec") or {}).get("publicKey") or ""))
    except EscrowError as exc:
        status.pop("fingerprint", None)
        status["admitted"] = False
        condition = Condition("Ready", False, "InvalidPublicKey", f"spec.publicKey: {exc}")
        await _write_agent_status(rt, obj, status, condition)
        return None
    admitted = await rt.call_hsm(
        "DescribeEscrowAgent", rt.hsm.escrow_agent_admitted(agent.fingerprint)
    )
    status.update(fingerprint=agent.fingerprint, keyBits=agent.bits, admitted=admitted)
    if admitted:
        condition = Condition(
            "Ready",
            True,
            "Admitted",
            f"the token holds key {agent.fingerprint} as a trusted wrapping key",
        )
    else:
        condition = Condition(
            "Ready",
            False,
            "NotAdmitted",
            f"the token does not trust key {agent.fingerprint} yet: its Security Officer must "
            "admit it (kustody escrow admit); until then the token refuses to wrap under it",
        )
    await _write_agent_status(rt, obj, status, condition)
    if status != (obj.get("status") or {}):
        for ring in rt.keyrings.values():
            if name in ((ring.get("spec") or {}).get("escrow") or {}).get("agents", ()):
                rt.enqueue("KeyRing", None, ring["metadata"]["name"], delay=0.5)
    # Admission happens outside the cluster (and a token can be replaced): look again.
    return AGENT_RESYNC_SECONDS * (10 if admitted else 1)


async def _write_agent_status(
    rt: Runtime, obj: Mapping[str, Any], status: dict[str, Any], condition: Condition
) -> None:
    meta = obj["metadata"]
    status["observedGeneration"] = meta.get("generation")
    status["conditions"] = merge(
        status.get("conditions") or (), [condition], meta.get("generation") or 0, rt.clock()
    )
    if status == (obj.get("status") or {}):
        return
    try:
        updated = await rt.kube.patch_status(
            ESCROW_AGENTS, meta["name"], status, resource_version=meta.get("resourceVersion")
        )
    except NotFound:
        return
    rt.escrow_agents.put(updated)
    old = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or ()}
    if (old.get("Ready") or {}).get("reason") != condition.reason:
        event = rt.events.normal if condition.status else rt.events.warning
        await event(updated, condition.reason, condition.message)


def _package_fingerprint(secret: Mapping[str, Any]) -> str | None:
    raw = (secret.get("data") or {}).get(PACKAGE_KEY)
    if not raw:
        return None
    try:
        return Package.from_json(base64.b64decode(raw)).fingerprint
    except (EscrowError, ValueError):
        return None


async def escrow_step(
    rt: Runtime,
    keyring: Mapping[str, Any],
    status: dict[str, Any],
    versions: Sequence[Version],
) -> tuple[Condition | None, list[tuple[str, str]]]:
    """Export what is missing. Returns the Escrowed condition (None without spec.escrow) and
    the Events owed as (reason, message); ``status`` gets escrowExports and escrowable."""
    name = str(keyring["metadata"]["name"])
    try:
        spec = EscrowSpec.parse((keyring.get("spec") or {}).get("escrow"))
    except EscrowError as exc:
        return Condition("Escrowed", False, "InvalidSpec", str(exc)), []
    if spec is None:
        return None, []
    described = await rt.call_hsm("DescribeKey", rt.hsm.describe_key(name))
    escrowable = {i.ref.version: i.escrowable for i in described.versions}
    status["versions"] = [
        {**v, "escrowable": escrowable.get(int(v["version"]), False)}
        for v in status.get("versions") or ()
    ]
    agents = {a: rt.escrow_agents.get(None, a) for a in spec.agents}
    run = _Exports(
        rt,
        name,
        agents,
        refused=refusals(spec.agents, spec.allowed_jurisdictions, agents),
        done={(int(e["version"]), str(e["agent"])): e for e in status.get("escrowExports") or ()},
    )
    live = [v for v in versions if v.state is not State.DESTROYED]
    stuck = [v.version for v in live if not escrowable.get(v.version)]
    for v in live:
        if v.version not in stuck:
            await run.export_version(v.version, spec.agents)
    status["escrowExports"] = sorted(
        run.done.values(), key=lambda e: (int(e["version"]), str(e["agent"]))
    )
    run.events += [("EscrowAgentRefused", r.describe()) for r in run.refused]
    return _escrowed(name, spec.agents, run, stuck), run.events


@dataclass
class _Exports:
    """The exports of one pass: what is recorded, what it made, what failed."""

    rt: Runtime
    ring: str
    agents: Mapping[str, Mapping[str, Any] | None]
    refused: Sequence[Refusal]
    done: dict[tuple[int, str], dict[str, Any]]
    events: list[tuple[str, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    async def export_version(self, version: int, agent_names: Sequence[str]) -> None:
        refused = {r.agent for r in self.refused}
        for agent_name in agent_names:
            if agent_name in refused or (version, agent_name) in self.done:
                continue
            agent = self.agents[agent_name] or {}
            fingerprint = str((agent.get("status") or {}).get("fingerprint") or "")
            try:
                entry, made = await _export_one(
                    self.rt, self.ring, version, agent_name, fingerprint
                )
            except HsmError as exc:
                if exc.reason not in (
                    Reason.ESCROW_AGENT_NOT_ADMITTED,
                    Reason.VERSION_NOT_ESCROWABLE,
                ):
                    raise
                self.rt.metrics.escrow_exports.labels("refused").inc()
                self.failures.append(f"v{version} → {agent_name}: {exc.message}")
                continue
            self.done[(version, agent_name)] = entry
            if made:
                self.rt.metrics.escrow_exports.labels("exported").inc()
                self.events.append(
                    (
                        "EscrowExported",
                        f"version {version} wrapped in the token for escrow agent "
                        f"{agent_name} ({fingerprint}); package {entry['packageFingerprint']} "
                        f"in Secret {self.rt.namespace}/{entry['secretName']}",
                    )
                )


def _escrowed(name: str, agents: Sequence[str], run: _Exports, stuck: Sequence[int]) -> Condition:
    if run.refused:
        return Condition(
            "Escrowed",
            False,
            "AgentRefused",
            "; ".join(r.describe() for r in run.refused) + "; nothing is exported to it",
        )
    if run.failures:
        return Condition("Escrowed", False, "EscrowExportFailed", "; ".join(run.failures))
    if stuck:
        return Condition(
            "Escrowed",
            False,
            "VersionNotEscrowable",
            f"version(s) {', '.join(map(str, stuck))} were created never-extractable, "
            "before spec.escrow was set, and cannot be escrowed; a rotation makes an "
            "escrowable version (kustody rotate " + name + ")",
        )
    return Condition(
        "Escrowed", True, "Exported", f"every live version is escrowed to {', '.join(agents)}"
    )


def _entry(
    version: int, agent: str, fingerprint: str, package: str, secret: str, at: str
) -> dict[str, Any]:
    """One KeyRing status.escrowExports entry."""
    return {
        "version": version,
        "agent": agent,
        "agentFingerprint": fingerprint,
        "packageFingerprint": package,
        "secretName": secret,
        "exportedAt": at,
    }


async def _export_one(
    rt: Runtime, ring: str, version: int, agent: str, fingerprint: str
) -> tuple[dict[str, Any], bool]:
    """(escrowExports entry, whether a package was made now). A package already stored in the
    operator namespace (a crash before the status was written) is recorded, not made again."""
    secret_name = package_secret_name(ring, version, agent)
    existing = await rt.kube.get_or_none(SECRETS, secret_name, rt.namespace)
    if existing is not None and (found := _package_fingerprint(existing)):
        at = str(
            (existing["metadata"].get("annotations") or {}).get("kustody.io/exported-at")
            or format_time(rt.clock())
        )
        return _entry(version, agent, fingerprint, found, secret_name, at), False
    reply = await rt.call_hsm("ExportEscrow", rt.hsm.export_escrow(ring, version, fingerprint))
    now = format_time(rt.clock())
    package = Package(
        agent_fingerprint=reply.agent_fingerprint,
        key_ring=reply.key_ring,
        version=reply.version,
        label=reply.label,
        object_id=reply.object_id,
        check_value=reply.check_value,
        mechanism=reply.mechanism,
        created_at=now,
        wrapped=reply.wrapped,
    )
    try:
        body = _package_secret(
            rt, secret_name, package, ring=ring, version=version, agent=agent, agent_fp=fingerprint
        )
        await rt.kube.create(SECRETS, body, rt.namespace)
    except Conflict:
        # Made by another pass meanwhile: record that one (this package is dropped).
        return await _export_one(rt, ring, version, agent, fingerprint)
    return _entry(version, agent, fingerprint, package.fingerprint, secret_name, now), True


def _package_secret(
    rt: Runtime, name: str, package: Package, *, ring: str, version: int, agent: str, agent_fp: str
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": PACKAGE_SECRET_TYPE,
        "metadata": {
            "name": name,
            "namespace": rt.namespace,
            "labels": {
                MANAGED_BY: MANAGER,
                LABEL_PACKAGE: "true",
                LABEL_KEYRING: ring,
                LABEL_VERSION: str(version),
                LABEL_AGENT: agent,
            },
            "annotations": {
                "kustody.io/exported-at": package.created_at,
                "kustody.io/package-fingerprint": package.fingerprint,
                "kustody.io/agent-fingerprint": agent_fp,
            },
        },
        "data": {PACKAGE_KEY: base64.b64encode(package.to_json().encode()).decode("ascii")},
    }
