#!/usr/bin/env python3
"""Generate docs/crd-reference.md from the CRD schemas in crds/ (their descriptions are the docs).

    python tools/gen_crd_reference.py          # rewrite docs/crd-reference.md
    python tools/gen_crd_reference.py --check  # exit 1 if it is stale

tests/unit/test_docs.py runs the check.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "crds"
TARGET = ROOT / "docs" / "crd-reference.md"
ORDER = ("KeyRing", "DataKey", "RotationPolicy")

Schema = dict[str, Any]


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _type(schema: Schema) -> str:
    kind = schema.get("type")
    if kind == "array":
        return f"[]{_type(schema.get('items') or {})}"
    if kind == "object" and "additionalProperties" in schema:
        return f"map[string]{_type(schema['additionalProperties'] or {})}"
    if schema.get("x-kubernetes-int-or-string"):
        return "int-or-string"
    if kind is None and schema.get("x-kubernetes-preserve-unknown-fields"):
        return "any"
    return str(kind or "object")


def _constraints(schema: Schema) -> str:
    parts: list[str] = []
    if "enum" in schema:
        parts.append("one of " + ", ".join(f"`{v}`" for v in schema["enum"]))
    for key, label in (
        ("minimum", "≥"),
        ("maximum", "≤"),
        ("minLength", "min length"),
        ("maxLength", "max length"),
        ("minItems", "min items"),
        ("maxItems", "max items"),
        ("minProperties", "min entries"),
        ("maxProperties", "max entries"),
    ):
        if key in schema:
            parts.append(f"{label} {schema[key]}")
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    if "format" in schema:
        parts.append(f"format {schema['format']}")
    if schema.get("x-kubernetes-list-type") == "map":
        keys = ", ".join(schema.get("x-kubernetes-list-map-keys") or ())
        parts.append(f"list keyed by {keys}")
    for rule in schema.get("x-kubernetes-validations") or ():
        parts.append(f"rule: {rule.get('message') or rule['rule']}")
    return "; ".join(_cell(p) for p in parts)


def _fields(schema: Schema, prefix: str) -> Iterator[tuple[str, Schema, bool]]:
    required = set(schema.get("required") or ())
    for name, sub in (schema.get("properties") or {}).items():
        path = f"{prefix}.{name}" if prefix else name
        yield path, sub, name in required
        node = sub
        if node.get("type") == "array":
            node = node.get("items") or {}
            path += "[]"
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
            path += ".*"
        if node.get("properties"):
            yield from _fields(node, path)


def _table(schema: Schema, prefix: str) -> list[str]:
    lines = [
        "| field | type | required | description | validation |",
        "| --- | --- | --- | --- | --- |",
    ]
    for path, sub, required in _fields(schema, prefix):
        lines.append(
            f"| `{path}` | {_cell(_type(sub))} | {'yes' if required else ''} | "
            f"{_cell(sub.get('description', ''))} | {_constraints(sub)} |"
        )
    return lines


def _crd(crd: Schema) -> list[str]:
    spec = crd["spec"]
    names = spec["names"]
    version = next(v for v in spec["versions"] if v.get("storage"))
    schema = version["schema"]["openAPIV3Schema"]
    kind = names["kind"]
    out = [
        f"## {kind}",
        "",
        _cell(schema.get("description", "")),
        "",
        f"- API version: `{spec['group']}/{version['name']}`",
        f"- Scope: {spec['scope']}",
        f"- Plural / singular: `{names['plural']}` / `{names['singular']}`",
        f"- Short names: {', '.join(f'`{s}`' for s in names.get('shortNames') or ()) or '-'}",
        f"- Categories: {', '.join(f'`{c}`' for c in names.get('categories') or ()) or '-'}",
        f"- Subresources: {', '.join(sorted(version.get('subresources') or {})) or '-'}",
        "",
    ]
    rules = schema.get("x-kubernetes-validations") or ()
    for part in ("spec",):
        sub = (schema.get("properties") or {}).get(part) or {}
        rules = [*rules, *(sub.get("x-kubernetes-validations") or ())]
    columns = version.get("additionalPrinterColumns") or ()
    if columns:
        out += [
            "### Printer columns (`kubectl get`)",
            "",
            "| column | JSONPath | priority | description |",
            "| --- | --- | --- | --- |",
        ]
        for col in columns:
            out.append(
                f"| {col['name']} | `{col['jsonPath']}` | {col.get('priority', 0)} | "
                f"{_cell(col.get('description', ''))} |"
            )
        out.append("")
    for part in ("spec", "status"):
        sub = (schema.get("properties") or {}).get(part)
        if not sub:
            continue
        out += [f"### {kind} `{part}`", "", _cell(sub.get("description", "")), ""]
        out += _table(sub, part)
        out.append("")
    if rules:
        out += [f"### {kind} validation rules (CEL)", ""]
        out += [f"- {_cell(r.get('message') or r['rule'])} (`{_cell(r['rule'])}`)" for r in rules]
        out.append("")
    return out


def render() -> str:
    crds = [yaml.safe_load(p.read_text()) for p in sorted(SOURCE.glob("*.yaml"))]
    crds.sort(key=lambda c: ORDER.index(k) if (k := c["spec"]["names"]["kind"]) in ORDER else 99)
    lines = [
        "# CRD reference",
        "",
        "<!-- Generated by tools/gen_crd_reference.py from crds/*.yaml; do not edit by hand."
        " tests/unit/test_docs.py fails when this file is stale. -->",
        "",
        "Every description below is the one `kubectl explain` shows. Defaults are applied by the",
        "operator, never by the API server (no `default:` in any schema), so the objects in the",
        "cluster stay identical to their Git copies. Condition types and reasons are listed in",
        "[architecture.md](architecture.md#conditions-reasons-and-events).",
        "",
        "Kinds: "
        + ", ".join(
            f"[{c['spec']['names']['kind']}](#{c['spec']['names']['kind'].lower()})" for c in crds
        ),
        "",
    ]
    for crd in crds:
        lines += _crd(crd)
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the reference is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} is stale: run tools/gen_crd_reference.py")
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
