"""``kustody doctor``'s look at KeyRings and DataKeys: not Ready, destruction near, rotation
overdue. Pure: it reads the objects the API returned."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kustody.cli.finding import ERROR, OK, WARNING, Finding, Options
from kustody.cli.report import age, rotation_overdue
from kustody.domain.timestamps import parse_time


def _ready(obj: Mapping[str, Any]) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            return dict(c)
    return {}


def check_keyrings(keyrings: Sequence[Mapping[str, Any]], opts: Options) -> list[Finding]:
    """KeyRings not Ready (with their reason), versions whose destruction is near, rotations
    that are overdue."""
    findings: list[Finding] = []
    for kr in keyrings:
        name = kr["metadata"]["name"]
        ready = _ready(kr)
        if ready.get("status") != "True":
            findings.append(
                Finding(
                    "keyrings",
                    ERROR,
                    f"KeyRing {name} is not Ready: {ready.get('reason') or 'Pending'}: "
                    f"{ready.get('message') or 'not reconciled yet'}",
                    f"kubectl describe keyring {name}",
                    f"keyring/{name}",
                )
            )
        impact = {
            int(i["version"]): i for i in (kr.get("status") or {}).get("destructionImpact") or ()
        }
        for v in (kr.get("status") or {}).get("versions") or ():
            when = parse_time(v.get("destroyAt"))
            if v.get("state") != "DestroyScheduled" or when is None:
                continue
            if when - opts.now <= opts.destroy_window:
                hit = impact.get(int(v["version"]))
                loses = (
                    f"; it would make {hit['dataKeys']} DataKey(s) and {hit['secrets']} "
                    "Secret(s) unreadable"
                    if hit
                    else ""
                )
                due = f"in {age(when, opts.now)}" if when > opts.now else "now (overdue)"
                findings.append(
                    Finding(
                        "destruction",
                        WARNING,
                        f"KeyRing {name} v{v['version']} will be destroyed {due} "
                        f"({v['destroyAt']}){loses}",
                        f"if it is still needed: kustody restore {name} {v['version']}",
                        f"keyring/{name}",
                    )
                )
        if rotation_overdue(kr, opts.now):
            due_at = (kr.get("status") or {}).get("nextRotationAt")
            findings.append(
                Finding(
                    "rotation",
                    WARNING,
                    f"KeyRing {name}: rotation was due at {due_at} and has not happened",
                    "check the operator's log and the KeyRing's conditions "
                    f"(kubectl describe keyring {name})",
                    f"keyring/{name}",
                )
            )
    if not findings:
        findings.append(
            Finding(
                "keyrings",
                OK,
                f"{len(keyrings)} KeyRing(s) Ready; no destruction in the next "
                f"{opts.destroy_window.days} days; no rotation overdue",
            )
        )
    return findings


def check_datakeys(datakeys: Sequence[Mapping[str, Any]]) -> list[Finding]:
    bad = [d for d in datakeys if _ready(d).get("status") != "True"]
    if not bad:
        return [Finding("datakeys", OK, f"{len(datakeys)} DataKey(s) Ready")]
    findings = []
    for d in bad[:20]:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        ready = _ready(d)
        findings.append(
            Finding(
                "datakeys",
                WARNING,
                f"DataKey {ns}/{name} is not Ready: {ready.get('reason') or 'Pending'}: "
                f"{ready.get('message') or 'not reconciled yet'}",
                f"kubectl describe datakey {name} -n {ns}",
                f"datakey/{ns}/{name}",
            )
        )
    if len(bad) > 20:
        findings.append(
            Finding(
                "datakeys", WARNING, f"... and {len(bad) - 20} more DataKeys not Ready",
                "kustody status -A",
            )
        )  # fmt: skip
    return findings
