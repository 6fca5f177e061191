"""``kustody status`` as data: the StatusReport (schema kustody.io/cli/v1) and its tables.

Pure: built from the objects the API returned and a clock, so the JSON a script reads and the
table a person reads come from the same values (the table is never the source).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kustody.domain.timestamps import format_time, parse_time

API_VERSION = "kustody.io/cli/v1"
# A rotation is overdue once its due time is this far behind (the operator checks every few
# seconds; a maintenance window is already part of nextRotationAt).
OVERDUE_AFTER = dt.timedelta(minutes=15)

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Scope:
    """What ``kustody status`` was asked for."""

    keyring: str | None = None
    namespace: str | None = None
    all_namespaces: bool = False

    @property
    def lists_datakeys(self) -> bool:
        return bool(self.keyring or self.namespace or self.all_namespaces)


def _condition(obj: Obj, type_: str = "Ready") -> dict[str, str]:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == type_:
            return {
                "status": str(c.get("status", "Unknown")),
                "reason": str(c.get("reason") or ""),
                "message": str(c.get("message") or ""),
            }
    return {"status": "Unknown", "reason": "Pending", "message": "not reconciled yet"}


def datakey_keyring(obj: Obj) -> str | None:
    name = ((obj.get("spec") or {}).get("keyRingRef") or {}).get("name")
    return str(name) if name else None


def rotation_overdue(keyring: Obj, now: dt.datetime) -> bool:
    due = parse_time((keyring.get("status") or {}).get("nextRotationAt"))
    return due is not None and now - due > OVERDUE_AFTER


def _opt_int(value: Any) -> int | None:
    return int(value) if isinstance(value, int) else None


def keyring_entry(kr: Obj, datakeys: Sequence[Obj], now: dt.datetime) -> dict[str, Any]:
    name = str(kr["metadata"]["name"])
    status = kr.get("status") or {}
    spec = kr.get("spec") or {}
    mine = [d for d in datakeys if datakey_keyring(d) == name]
    not_ready = [d for d in mine if _condition(d)["status"] != "True"]
    return {
        "name": name,
        "ready": _condition(kr),
        "primaryVersion": _opt_int(status.get("primaryVersion")),
        "rotationPolicy": (spec.get("rotationPolicyRef") or {}).get("name"),
        "nextRotationAt": status.get("nextRotationAt"),
        "lastRotationAt": status.get("lastRotationAt"),
        "rotationOverdue": rotation_overdue(kr, now),
        "versions": [
            {
                "version": int(v["version"]),
                "state": str(v.get("state", "Unknown")),
                "fingerprint": str(v.get("fingerprint") or ""),
                "createdAt": v.get("createdAt"),
                "disabledAt": v.get("disabledAt"),
                "destroyAt": v.get("destroyAt"),
                "dataKeys": int(v.get("dataKeys") or 0),
            }
            for v in status.get("versions") or ()
        ],
        "destructionImpact": [
            {
                "version": int(i["version"]),
                "dataKeys": int(i.get("dataKeys") or 0),
                "secrets": int(i.get("secrets") or 0),
            }
            for i in status.get("destructionImpact") or ()
        ],
        "dataKeys": {"total": len(mine), "notReady": len(not_ready)},
    }


def _event_time(event: Obj) -> str:
    return str(
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or (event.get("metadata") or {}).get("creationTimestamp")
        or ""
    )


def _revision(event: Obj) -> int:
    # Event times have second precision; within one second the later write has the higher
    # resourceVersion (used only to break that tie).
    value = str((event.get("metadata") or {}).get("resourceVersion") or "0")
    return int(value) if value.isdigit() else 0


def last_events(events: Iterable[Obj]) -> dict[tuple[str, str], dict[str, str]]:
    """The newest Event of each DataKey, by (namespace, name)."""
    newest: dict[tuple[str, str], dict[str, str]] = {}
    order = sorted(events, key=lambda e: (_event_time(e), _revision(e)))
    for e in order:
        involved = e.get("involvedObject") or {}
        if involved.get("kind") != "DataKey":
            continue
        key = (str(involved.get("namespace") or ""), str(involved.get("name") or ""))
        entry = {
            "type": str(e.get("type") or ""),
            "reason": str(e.get("reason") or ""),
            "message": str(e.get("message") or ""),
            "time": _event_time(e),
        }
        newest[key] = entry  # in time order: the last one stays
    return newest


def datakey_entry(dk: Obj, last_event: dict[str, str] | None) -> dict[str, Any]:
    status = dk.get("status") or {}
    spec = dk.get("spec") or {}
    meta = dk["metadata"]
    return {
        "namespace": str(meta.get("namespace") or ""),
        "name": str(meta["name"]),
        "keyRing": datakey_keyring(dk),
        "keyRingVersion": _opt_int(status.get("keyRingVersion")),
        "generation": _opt_int(status.get("dekGeneration")),
        "secret": (status.get("secretRef") or {}).get("name") or spec.get("secretName"),
        "consumers": [str(c) for c in spec.get("consumers") or ()],
        "ready": _condition(dk),
        "lastRewrapAt": status.get("lastRewrapAt"),
        "lastEvent": last_event,
    }


def build_status(
    scope: Scope,
    keyrings: Sequence[Obj],
    datakeys: Sequence[Obj],
    events: Iterable[Obj],
    now: dt.datetime,
) -> dict[str, Any]:
    """The StatusReport for ``scope``: ``keyrings`` and ``datakeys`` as listed (cluster-wide or
    in the namespace asked for); ``events`` may be empty when no DataKey is listed."""
    in_scope = list(datakeys)
    if scope.keyring:
        in_scope = [d for d in in_scope if datakey_keyring(d) == scope.keyring]
    rings = sorted(keyrings, key=lambda k: str(k["metadata"]["name"]))
    if scope.keyring:
        rings = [k for k in rings if k["metadata"]["name"] == scope.keyring]
    elif scope.namespace:
        used = {datakey_keyring(d) for d in in_scope}
        rings = [k for k in rings if k["metadata"]["name"] in used]
    newest = last_events(events) if scope.lists_datakeys else {}
    listed = (
        sorted(in_scope, key=lambda d: (d["metadata"].get("namespace", ""), d["metadata"]["name"]))
        if scope.lists_datakeys
        else []
    )
    return {
        "apiVersion": API_VERSION,
        "kind": "StatusReport",
        "generatedAt": format_time(now),
        "scope": {
            "keyRing": scope.keyring,
            "namespace": scope.namespace,
            "allNamespaces": scope.all_namespaces,
        },
        "keyRings": [keyring_entry(k, datakeys, now) for k in rings],
        "dataKeys": [
            datakey_entry(
                d, newest.get((d["metadata"].get("namespace", ""), d["metadata"]["name"]))
            )
            for d in listed
        ],
    }


# -- tables -----------------------------------------------------------------------------------


def age(when: dt.datetime, now: dt.datetime) -> str:
    """kubectl's short durations: 45s, 12m, 5h, 3d."""
    seconds = abs(int((now - when).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _relative(stamp: str | None, now: dt.datetime) -> str:
    when = parse_time(stamp)
    if when is None:
        return ""
    return f"in {age(when, now)}" if when >= now else f"overdue by {age(when, now)}"


def table(rows: Sequence[Sequence[str]]) -> str:
    """Columns padded like kubectl's: three spaces between, no trailing blanks."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def render_keyrings(report: Mapping[str, Any], now: dt.datetime, wide: bool = False) -> str:
    lines: list[str] = []
    for kr in report["keyRings"]:
        ready = kr["ready"]
        nxt = kr["nextRotationAt"]
        when = "on request only" if nxt is None else f"{nxt} ({_relative(nxt, now)})"
        lines.append(
            f"KeyRing {kr['name']}: Ready={ready['status']} ({ready['reason'] or 'Pending'}), "
            f"primary v{kr['primaryVersion'] or '-'}, next rotation {when}"
        )
        if wide:
            lines.append(
                f"  policy {kr['rotationPolicy'] or '-'}, last rotation "
                f"{kr['lastRotationAt'] or '-'}"
            )
        for v in kr["versions"]:
            extra = f", destroy at {v['destroyAt']}" if v["destroyAt"] else ""
            if wide:
                extra += f", created {v['createdAt'] or '-'}"
                if v["disabledAt"]:
                    extra += f", disabled {v['disabledAt']}"
            lines.append(
                f"  v{v['version']:<4} {v['state']:<17} fingerprint {v['fingerprint']}  "
                f"{v['dataKeys']} DataKey(s){extra}"
            )
        for impact in kr["destructionImpact"]:
            lines.append(
                f"  ! destroying v{impact['version']} would make {impact['dataKeys']} DataKey(s) "
                f"and {impact['secrets']} Secret(s) unreadable"
            )
        counts = kr["dataKeys"]
        lines.append(f"  DataKeys: {counts['total']}, not Ready: {counts['notReady']}")
    return "\n".join(lines)


def render_datakeys(report: Mapping[str, Any], now: dt.datetime, wide: bool = False) -> str:
    items = report["dataKeys"]
    show_ns = report["scope"]["allNamespaces"] or (
        report["scope"]["keyRing"] and not report["scope"]["namespace"]
    )
    head = [
        "NAME",
        "READY",
        "KEYRING",
        "VERSION",
        "GENERATION",
        "SECRET",
        "CONSUMERS",
        "LAST EVENT",
    ]
    if wide:
        head += ["REASON", "LAST REWRAP", "MESSAGE"]
    if show_ns:
        head.insert(0, "NAMESPACE")
    rows = [head]
    for d in items:
        event = d["lastEvent"]
        when = parse_time(event["time"]) if event else None
        last = f"{event['reason']} ({age(when, now)} ago)" if event and when else "<none>"
        if event and not when:
            last = event["reason"]
        row = [
            d["name"],
            d["ready"]["status"],
            d["keyRing"] or "",
            str(d["keyRingVersion"] or "-"),
            str(d["generation"] or "-"),
            d["secret"] or "",
            ",".join(d["consumers"]) or "<none>",
            last,
        ]
        if wide:
            row += [d["ready"]["reason"], d["lastRewrapAt"] or "-", d["ready"]["message"]]
        if show_ns:
            row.insert(0, d["namespace"])
        rows.append(row)
    return table(rows)


def render_status(report: Mapping[str, Any], now: dt.datetime, wide: bool = False) -> str:
    """The table of ``kustody status``: KeyRing blocks, then the DataKeys asked for."""
    scope = report["scope"]
    parts: list[str] = []
    if scope["keyRing"] or not (scope["namespace"] or scope["allNamespaces"]):
        parts.append(render_keyrings(report, now, wide) or "no KeyRings")
    if report["dataKeys"]:
        parts.append(render_datakeys(report, now, wide))
    elif scope["namespace"] or scope["allNamespaces"] or scope["keyRing"]:
        where = f" in namespace {scope['namespace']}" if scope["namespace"] else ""
        parts.append(f"no DataKeys{where}")
    return "\n\n".join(parts)
