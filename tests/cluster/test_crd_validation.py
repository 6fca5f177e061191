"""The CRDs against the real kube-apiserver: they install, the examples pass, mistakes fail.

Each file in tests/cluster/invalid/ holds one object with one mistake; its first line,
`# expect: <field path>`, names the field the API server's error must mention. Together they
prove that the schema and its CEL rules (not Python code in the operator) catch the mistakes,
and that the errors point at the field to fix.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:
    from kustody.dev.controlplane import Cluster

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
CRD_DIR = ROOT / "crds"
EXAMPLES_DIR = ROOT / "examples"
INVALID_FILES = sorted((ROOT / "tests" / "cluster" / "invalid").glob("*.yaml"))
SCRATCH_NAMESPACE = "kustody-crd-validation"


def _crd_names() -> list[str]:
    return [
        yaml.safe_load(p.read_text())["metadata"]["name"] for p in sorted(CRD_DIR.glob("*.yaml"))
    ]


def _expected_substring(path: Path) -> str:
    first_line = path.read_text().splitlines()[0]
    prefix = "# expect: "
    assert first_line.startswith(prefix), f"{path.name}: first line must be '{prefix}<field>'"
    return first_line.removeprefix(prefix).strip()


def _namespace_manifest(name: str) -> str:
    return yaml.safe_dump({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


@pytest.fixture(scope="module")
def crds(kube: Cluster) -> list[str]:
    """The CRDs from crds/, applied server-side and Established."""
    names = _crd_names()
    kube.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", *[f"crd/{n}" for n in names]
    )
    return names


@pytest.fixture(scope="module")
def scratch_namespace(kube: Cluster, crds: list[str]) -> str:
    """A namespace for namespaced dry runs (an admission check needs it to exist)."""
    kube.kubectl("apply", "--server-side", "-f", "-", input=_namespace_manifest(SCRATCH_NAMESPACE))
    return SCRATCH_NAMESPACE


def test_crds_apply_idempotently_and_are_accepted(kube: Cluster, crds: list[str]) -> None:
    kube.kubectl("apply", "--server-side", "-f", str(CRD_DIR))
    for name in crds:
        crd = json.loads(kube.kubectl("get", f"crd/{name}", "-o", "json").stdout)
        conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
        assert conditions.get("Established") == "True", (name, conditions)
        assert conditions.get("NamesAccepted") == "True", (name, conditions)
        assert conditions.get("NonStructuralSchema") != "True", (name, conditions)


def test_kustody_category_lists_all_kinds(kube: Cluster, crds: list[str]) -> None:
    resources = kube.kubectl("api-resources", "--categories=kustody", "-o", "name").stdout.split()
    assert sorted(resources) == sorted(crds)


def test_explain_shows_the_descriptions(kube: Cluster, crds: list[str]) -> None:
    out = kube.kubectl("explain", "datakeys.spec.length").stdout
    assert "16 to 64" in out
    out = kube.kubectl("explain", "rotationpolicies.spec.destroyAfter").stdout
    assert "720h" in out


def test_examples_are_accepted(kube: Cluster, crds: list[str]) -> None:
    # A dry-run create in a namespace that does not exist yet is refused by admission, so
    # the examples' Namespaces are created for real first.
    for path in sorted(EXAMPLES_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == "Namespace":
                kube.kubectl("apply", "--server-side", "-f", "-", input=yaml.safe_dump(doc))
    result = kube.kubectl(
        "apply", "--server-side", "--dry-run=server", "-f", str(EXAMPLES_DIR), check=False
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("path", INVALID_FILES, ids=[p.stem for p in INVALID_FILES])
def test_invalid_manifest_is_rejected_naming_the_field(
    kube: Cluster, scratch_namespace: str, path: Path
) -> None:
    expected = _expected_substring(path)
    result = kube.kubectl(
        "create",
        "--dry-run=server",
        "--validate=strict",
        "--namespace",
        scratch_namespace,
        "-f",
        str(path),
        check=False,
    )
    assert result.returncode != 0, f"{path.name} was accepted:\n{result.stdout}"
    assert expected in result.stderr, f"{path.name}: {expected!r} not in:\n{result.stderr}"


# --- updates: immutable fields ------------------------------------------------------------

KEYRING = {
    "apiVersion": "kustody.io/v1alpha1",
    "kind": "KeyRing",
    "spec": {"algorithm": "AES256GCM", "provider": {"name": "primary"}},
}
DATAKEY = {
    "apiVersion": "kustody.io/v1alpha1",
    "kind": "DataKey",
    "spec": {
        "keyRingRef": {"name": "crd-validation"},
        "secretName": "immutability-dek",
        "encryptionContext": {"app": "ledger"},
    },
}

# (id, object, merge patch, the field the error must name; None when the update is allowed)
UPDATES = [
    (
        "keyring-provider-changed",
        KEYRING,
        {"spec": {"provider": {"name": "other"}}},
        "spec.provider",
    ),
    ("keyring-provider-removed", KEYRING, {"spec": {"provider": None}}, "spec.provider"),
    ("keyring-deletion-policy-changed", KEYRING, {"spec": {"deletionPolicy": "Destroy"}}, None),
    (
        "datakey-keyring-changed",
        DATAKEY,
        {"spec": {"keyRingRef": {"name": "other"}}},
        "spec.keyRingRef",
    ),
    ("datakey-length-changed", DATAKEY, {"spec": {"length": 48}}, "spec.length"),
    ("datakey-default-length-written-out", DATAKEY, {"spec": {"length": 32}}, None),
    (
        "datakey-context-changed",
        DATAKEY,
        {"spec": {"encryptionContext": {"app": "other"}}},
        "spec.encryptionContext",
    ),
    (
        "datakey-context-removed",
        DATAKEY,
        {"spec": {"encryptionContext": None}},
        "spec.encryptionContext",
    ),
    ("datakey-secret-renamed", DATAKEY, {"spec": {"secretName": "renamed-dek"}}, None),
]


@pytest.fixture
def created(kube: Cluster, scratch_namespace: str) -> Iterator[list[str]]:
    """Collects the `kind/name` of objects a test creates for real; deletes them afterwards."""
    made: list[str] = []
    yield made
    for ref in made:
        kube.kubectl(
            "delete",
            ref,
            "--namespace",
            scratch_namespace,
            "--ignore-not-found",
            "--wait=false",
            check=False,
        )


@pytest.mark.parametrize(
    ("obj", "patch", "expected"),
    [pytest.param(obj, patch, expected, id=case) for case, obj, patch, expected in UPDATES],
)
def test_update_respects_immutable_fields(
    kube: Cluster,
    scratch_namespace: str,
    created: list[str],
    obj: dict[str, Any],
    patch: dict[str, Any],
    expected: str | None,
) -> None:
    name = f"crd-immutable-{secrets.token_hex(3)}"
    manifest = {**obj, "metadata": {"name": name}}
    kube.kubectl("create", "--namespace", scratch_namespace, "-f", "-", input=json.dumps(manifest))
    ref = f"{obj['kind'].lower()}/{name}"
    created.append(ref)
    result = kube.kubectl(
        "patch",
        ref,
        "--namespace",
        scratch_namespace,
        "--type=merge",
        "-p",
        json.dumps(patch),
        check=False,
    )
    if expected is None:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, f"update was accepted: {result.stdout}"
        assert expected in result.stderr, result.stderr
