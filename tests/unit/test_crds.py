"""The CRDs in crds/ are the single source of truth; these checks need no cluster.

They enforce what makes a CRD readable and GitOps-safe: a description on every field (so
`kubectl explain` teaches the API), no server-side defaults, bounded strings, lists and maps
(so the API server accepts the CEL cost), printer columns that point at real fields, and
examples and invalid-manifest files that match the schemas.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
EXAMPLES_DIR = ROOT / "examples"
INVALID_DIR = ROOT / "tests" / "cluster" / "invalid"

GROUP = "kustody.io"
VERSION = "v1alpha1"

Schema = dict[str, Any]

EXPECTED_NAMES: dict[str, dict[str, Any]] = {
    "KeyRing": {"plural": "keyrings", "singular": "keyring", "short": ["kr"], "scope": "Cluster"},
    "DataKey": {
        "plural": "datakeys",
        "singular": "datakey",
        "short": ["dk"],
        "scope": "Namespaced",
    },
    "RotationPolicy": {
        "plural": "rotationpolicies",
        "singular": "rotationpolicy",
        "short": ["rp"],
        "scope": "Cluster",
    },
    "EscrowAgent": {
        "plural": "escrowagents",
        "singular": "escrowagent",
        "short": ["ea"],
        "scope": "Cluster",
    },
}

# (name, priority) of each printer column, in order.
EXPECTED_COLUMNS: dict[str, list[tuple[str, int]]] = {
    "KeyRing": [
        ("Ready", 0),
        ("Version", 0),
        ("Policy", 0),
        ("Age", 0),
        ("Next Rotation", 1),
        ("Deletion Policy", 1),
        ("Reason", 1),
    ],
    "DataKey": [
        ("Ready", 0),
        ("KeyRing", 0),
        ("Version", 0),
        ("Secret", 0),
        ("Age", 0),
        ("Generation", 1),
        ("Reason", 1),
    ],
    "RotationPolicy": [
        ("Period", 0),
        ("Retire After", 0),
        ("Destroy After", 0),
        ("Rewrap", 0),
        ("Age", 0),
    ],
    "EscrowAgent": [
        ("Jurisdiction", 0),
        ("Admitted", 0),
        ("Ready", 0),
        ("Age", 0),
        ("Fingerprint", 1),
        ("Reason", 1),
    ],
}

# Standard fields whose schema the API server fixes (root metadata may only restrict name).
STANDARD_ROOT_FIELDS = {"apiVersion", "kind", "metadata"}


def _load_crds() -> dict[str, dict[str, Any]]:
    crds: dict[str, dict[str, Any]] = {}
    for path in sorted(CRD_DIR.glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert len(docs) == 1, f"{path.name}: one CRD per file"
        crd = docs[0]
        crds[crd["spec"]["names"]["kind"]] = crd
    return crds


CRDS = _load_crds()


def _schema(kind: str) -> Schema:
    (version,) = CRDS[kind]["spec"]["versions"]
    schema: Schema = version["schema"]["openAPIV3Schema"]
    return schema


def _walk(schema: Schema, path: str) -> Iterator[tuple[str, Schema]]:
    """Every schema node below (and including) `schema`, with a dotted field path."""
    yield path, schema
    for name, sub in schema.get("properties", {}).items():
        yield from _walk(sub, f"{path}.{name}" if path else name)
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.*")


def _user_nodes(kind: str) -> Iterator[tuple[str, Schema]]:
    """Schema nodes this project writes: everything except the root's standard fields."""
    root = _schema(kind)
    yield "", root
    for name, sub in root["properties"].items():
        if name not in STANDARD_ROOT_FIELDS:
            yield from _walk(sub, name)


def _keys_anywhere(node: Any, key: str) -> list[str]:
    found: list[str] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                found.append(key)
            found.extend(_keys_anywhere(v, key))
    elif isinstance(node, list):
        for item in node:
            found.extend(_keys_anywhere(item, key))
    return found


def _resolve(schema: Schema, dotted: str) -> Schema | None:
    """The schema node at a simple path like `.spec.a.b` or `.status.c[?(...)].d`."""
    node: Schema | None = schema
    for part in re.sub(r"\[[^\]]*\]", "[]", dotted).strip(".").split("."):
        if node is None:
            return None
        name, is_list = part.removesuffix("[]"), part.endswith("[]")
        node = node.get("properties", {}).get(name)
        if node is not None and is_list:
            node = node.get("items")
    return node


def test_the_four_crds_exist() -> None:
    assert set(CRDS) == set(EXPECTED_NAMES)


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_names_scope_and_category(kind: str) -> None:
    crd = CRDS[kind]
    expected = EXPECTED_NAMES[kind]
    names = crd["spec"]["names"]
    assert crd["apiVersion"] == "apiextensions.k8s.io/v1"
    assert crd["metadata"]["name"] == f"{expected['plural']}.{GROUP}"
    assert crd["spec"]["group"] == GROUP
    assert crd["spec"]["scope"] == expected["scope"]
    assert names["plural"] == expected["plural"]
    assert names["singular"] == expected["singular"]
    assert names["listKind"] == f"{kind}List"
    assert names["shortNames"] == expected["short"]
    assert names["categories"] == ["kustody"]


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_one_served_storage_version_with_status_subresource(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    assert version["name"] == VERSION
    assert version["served"] is True
    assert version["storage"] is True
    assert version["subresources"] == {"status": {}}
    assert {"spec", "status"} <= set(_schema(kind)["properties"])


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_every_field_has_a_description(kind: str) -> None:
    missing = [path or "<root>" for path, node in _user_nodes(kind) if not node.get("description")]
    assert not missing, f"{kind}: fields without a description: {missing}"


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_no_server_side_defaults(kind: str) -> None:
    # A default would make the object in the cluster differ from its Git copy.
    assert not _keys_anywhere(CRDS[kind], "default")


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_enums_are_strings(kind: str) -> None:
    for path, node in _user_nodes(kind):
        if "enum" in node:
            assert node["type"] == "string", path
            assert all(isinstance(v, str) for v in node["enum"]), path


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_strings_lists_and_maps_are_bounded(kind: str) -> None:
    unbounded = []
    for path, node in _user_nodes(kind):
        kind_of = node.get("type")
        if kind_of == "string" and not (
            "maxLength" in node or "enum" in node or node.get("format") == "date-time"
        ):
            unbounded.append(path)
        if kind_of == "array" and "maxItems" not in node:
            unbounded.append(path)
        if kind_of == "object" and "additionalProperties" in node and "maxProperties" not in node:
            unbounded.append(path)
    assert not unbounded, f"{kind}: unbounded fields: {unbounded}"


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_lists_declare_their_type(kind: str) -> None:
    for path, node in _user_nodes(kind):
        if node.get("type") == "array":
            assert node.get("x-kubernetes-list-type") in {"atomic", "set", "map"}, path
            if node["x-kubernetes-list-type"] == "map":
                keys = node["x-kubernetes-list-map-keys"]
                assert set(keys) <= set(node["items"].get("required", [])), path


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_conditions_follow_the_api_conventions(kind: str) -> None:
    conditions = _schema(kind)["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-type"] == "map"
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
    item = conditions["items"]
    assert set(item["properties"]) == {
        "type",
        "status",
        "observedGeneration",
        "lastTransitionTime",
        "reason",
        "message",
    }
    assert item["properties"]["status"]["enum"] == ["True", "False", "Unknown"]
    assert "phase" not in _schema(kind)["properties"]["status"]["properties"]
    assert "observedGeneration" in _schema(kind)["properties"]["status"]["properties"]


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_validation_rules_have_messages_and_valid_field_paths(kind: str) -> None:
    for path, node in _user_nodes(kind):
        for rule in node.get("x-kubernetes-validations", []):
            assert rule.get("message"), f"{path}: rule without a message: {rule['rule']}"
            if "fieldPath" in rule:
                assert _resolve(node, rule["fieldPath"]) is not None, (path, rule["fieldPath"])


@pytest.mark.parametrize("kind", sorted(EXPECTED_NAMES))
def test_printer_columns(kind: str) -> None:
    (version,) = CRDS[kind]["spec"]["versions"]
    columns = version["additionalPrinterColumns"]
    assert [(c["name"], c.get("priority", 0)) for c in columns] == EXPECTED_COLUMNS[kind]
    for column in columns:
        if column["name"] == "Age":
            assert column == {
                "name": "Age",
                "type": "date",
                "jsonPath": ".metadata.creationTimestamp",
            }
            continue
        assert column.get("description"), column["name"]
        assert _resolve(_schema(kind), column["jsonPath"]) is not None, column["jsonPath"]
        if column["name"] in {"Ready", "Reason"}:
            assert '[?(@.type=="Ready")]' in column["jsonPath"]


def test_immutable_fields_are_guarded_by_transition_rules() -> None:
    def rules(node: Schema) -> str:
        return " ".join(r["rule"] for r in node.get("x-kubernetes-validations", []))

    keyring_spec = _schema("KeyRing")["properties"]["spec"]
    assert "oldSelf" in rules(keyring_spec["properties"]["algorithm"])
    assert "oldSelf.provider" in rules(keyring_spec)
    datakey_spec = _schema("DataKey")["properties"]["spec"]
    assert "oldSelf" in rules(datakey_spec["properties"]["keyRingRef"])
    assert "oldSelf.length" in rules(datakey_spec)
    assert "oldSelf.encryptionContext" in rules(datakey_spec)


def test_rotate_annotation_is_documented() -> None:
    assert "kustody.io/rotate-requested-at" in _schema("KeyRing")["description"]


# --- examples and the invalid corpus must match the schemas -------------------------------


def _check_against_schema(value: Any, schema: Schema, path: str) -> list[str]:
    """A small structural check: unknown fields, missing required fields, enums and types."""
    problems: list[str] = []
    kind_of = schema.get("type")
    if kind_of == "object" and isinstance(value, dict):
        props = schema.get("properties")
        for name in schema.get("required", []):
            if name not in value:
                problems.append(f"{path}.{name}: required")
        for name, sub in value.items():
            if props is not None and name in props:
                problems += _check_against_schema(sub, props[name], f"{path}.{name}")
            elif isinstance(schema.get("additionalProperties"), dict):
                sub_schema = schema["additionalProperties"]
                problems += _check_against_schema(sub, sub_schema, f"{path}.{name}")
            elif props is not None:
                problems.append(f"{path}.{name}: unknown field")
    elif kind_of == "array" and isinstance(value, list):
        for i, item in enumerate(value):
            problems += _check_against_schema(item, schema["items"], f"{path}[{i}]")
    else:
        python_types = {"string": str, "integer": int, "boolean": bool, "object": dict}
        expected = python_types.get(str(kind_of))
        if expected is not None and not isinstance(value, expected):
            problems.append(f"{path}: expected {kind_of}")
        if "enum" in schema and value not in schema["enum"]:
            problems.append(f"{path}: {value!r} not in {schema['enum']}")
    return problems


def _example_docs() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def test_examples_cover_every_kind() -> None:
    kinds = [doc["kind"] for _, doc in _example_docs()]
    assert kinds.count("RotationPolicy") >= 1
    assert kinds.count("KeyRing") >= 1
    assert kinds.count("DataKey") >= 2
    namespaces = {
        doc["metadata"]["name"] for _, doc in _example_docs() if doc["kind"] == "Namespace"
    }
    assert "payments" in namespaces


def test_examples_match_the_schemas() -> None:
    for filename, doc in _example_docs():
        if doc["kind"] == "Namespace":
            assert doc["apiVersion"] == "v1"
            continue
        assert doc["kind"] in CRDS, f"{filename}: unknown kind {doc['kind']}"
        assert doc["apiVersion"] == f"{GROUP}/{VERSION}", filename
        assert "status" not in doc, filename
        namespaced = EXPECTED_NAMES[doc["kind"]]["scope"] == "Namespaced"
        assert ("namespace" in doc["metadata"]) == namespaced, filename
        problems = _check_against_schema(
            doc["spec"], _schema(doc["kind"])["properties"]["spec"], "spec"
        )
        assert not problems, f"{filename} {doc['metadata']['name']}: {problems}"


def test_examples_reference_each_other() -> None:
    by_kind: dict[str, set[str]] = {}
    for _, doc in _example_docs():
        by_kind.setdefault(doc["kind"], set()).add(doc["metadata"]["name"])
    for _, doc in _example_docs():
        if doc["kind"] == "KeyRing" and "rotationPolicyRef" in doc["spec"]:
            assert doc["spec"]["rotationPolicyRef"]["name"] in by_kind["RotationPolicy"]
        if doc["kind"] == "DataKey":
            assert doc["spec"]["keyRingRef"]["name"] in by_kind["KeyRing"]
    rich = [
        doc
        for _, doc in _example_docs()
        if doc["kind"] == "DataKey" and "rolloutRestartTargets" in doc["spec"]
    ]
    assert any("template" in doc["spec"] for doc in rich)


INVALID_FILES = sorted(INVALID_DIR.glob("*.yaml"))


def test_invalid_corpus_is_large_enough() -> None:
    assert len(INVALID_FILES) >= 35
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in INVALID_FILES}
    assert kinds == set(CRDS)


@pytest.mark.parametrize("path", INVALID_FILES, ids=[p.stem for p in INVALID_FILES])
def test_invalid_file_is_one_object_with_an_expectation(path: Path) -> None:
    text = path.read_text()
    first_line = text.splitlines()[0]
    assert re.fullmatch(r"# expect: \S+", first_line), first_line
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert len(docs) == 1
    (doc,) = docs
    assert doc["kind"] in CRDS
    assert doc["apiVersion"] == f"{GROUP}/{VERSION}"
    # The cluster test picks the namespace; a fixed one would need to exist.
    assert "namespace" not in doc["metadata"]
