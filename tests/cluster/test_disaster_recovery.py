"""Disaster recovery, drilled (issue 12): the lost-cluster drill.

A control plane with a KeyRing (rotated once) and DataKeys with two DEK generations each is
backed up with ``kustody backup export``; then the control plane's state is deleted entirely
(its etcd and certificates, the whole directory). A fresh control plane gets ``kustody backup
restore`` and the declarations, applied as Git would. Every DataKey must adopt its old DEKs
(every generation, same key ids), no DEK may be generated, and data encrypted with
``kustody.client`` before the rebuild must still decrypt from the new Secrets. A Secret that
does not decrypt under its DataKey's binding is never adopted.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from kustody.api.client import Binding, HsmClient
from kustody.client.keyset import Keyset
from kustody.dev.controlplane import Cluster
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody_helpers import condition, eventually, get, isolated_plane, kustody_cli, ready

pytestmark = pytest.mark.slow

N = 8
RING = "drill"
NS = "drill"


def _declarations() -> str:
    """What Git holds: the namespace, the KeyRing, the DataKeys (no status, no Secrets)."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": RING},
            "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [NS]}},
        },
    ]
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i}", "namespace": NS},
            "spec": {
                "keyRingRef": {"name": RING},
                "secretName": f"dk-{i}-dek",
                "encryptionContext": {"app": f"app-{i}"},
            },
        }
        for i in range(N)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def _items(plane: Cluster, kind: str) -> list[dict[str, Any]]:
    return list(json.loads(plane.kubectl("get", kind, "-n", NS, "-o", "json").stdout)["items"])


def _secret_keyset(secret: dict[str, Any]) -> dict[str, Any]:
    return dict(json.loads(base64.b64decode(secret["data"]["keyset"])))


def _open_keyset(socket: Path, secret: dict[str, Any]) -> tuple[Keyset, dict[int, bytes]]:
    """What `kustody unwrap` gives the workload: the keyset with every DEK (here through the
    sidecar's operator socket; the test is trusted like the operator)."""
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    wrapped = json.loads(data["keyset"])
    context = json.loads(data["encryption-context"])
    binding = Binding(context["namespace"], context["dataKey"], context["encryptionContext"])

    async def call() -> list[bytes]:
        async with HsmClient.unix(socket) as hsm:
            return [
                await hsm.decrypt(k["wrappedKey"], binding, allow_plaintext_export=True)
                for k in wrapped["keys"]
            ]

    deks = asyncio.run(call())
    document = {
        "format": "kustody.io/keyset/v1",
        "dataKey": {"namespace": context["namespace"], "name": context["dataKey"]},
        "primaryKeyId": wrapped["primaryKeyId"],
        "keys": [
            {
                "keyId": k["keyId"],
                "generation": k["generation"],
                "status": k["status"],
                "key": base64.b64encode(dek).decode(),
            }
            for k, dek in zip(wrapped["keys"], deks, strict=True)
        ],
    }
    keys = {k["keyId"]: dek for k, dek in zip(wrapped["keys"], deks, strict=True)}
    return Keyset.from_json(json.dumps(document)), keys


def _settled(plane: Cluster, generations: int, version: int) -> bool:
    dks = _items(plane, "datakeys")
    return len(dks) == N and all(
        ready(d)
        and len(d["status"].get("generations") or ()) == generations
        and all(g["keyRingVersion"] == version for g in d["status"]["generations"])
        for d in dks
    )


def _reasons(plane: Cluster) -> dict[str, list[str]]:
    events = json.loads(plane.kubectl("get", "events", "-n", NS, "-o", "json").stdout)["items"]
    out: dict[str, list[str]] = {}
    for e in events:
        if e["involvedObject"]["kind"] == "DataKey":
            out.setdefault(e["involvedObject"]["name"], []).append(e["reason"])
    return out


@pytest.fixture
def stack(make_softhsm_token: Callable[[str], SoftHSMToken], tmp_path: Path) -> Iterator[Sidecar]:
    """One token and its sidecar: they outlive both control planes (the token is not lost)."""
    sidecar = Sidecar(tmp_path / "hsm", make_softhsm_token("drill")).start()
    try:
        yield sidecar
    finally:
        sidecar.stop()


def test_lost_cluster_drill_every_datakey_adopts_its_old_deks(
    kube: Cluster, stack: Sidecar, tmp_path: Path
) -> None:
    backup_file = tmp_path / "datakeys.backup.json"
    first_dir = tmp_path / "plane-1"
    first = isolated_plane(kube, first_dir)
    plane = next(first)
    operator = Operator(tmp_path / "op-1", plane, stack.socket, name="drill-op-1")
    records: dict[str, list[tuple[bytes, bytes]]] = {}  # DataKey → (ciphertext, plaintext)
    try:
        operator.start().wait_active()
        plane.kubectl("apply", "--server-side", "-f", "-", input=_declarations())
        eventually(lambda: _settled(plane, 1, 1), 120, "every DataKey Ready, generation 1")
        for s in _items(plane, "secrets"):
            ks, _ = _open_keyset(stack.socket, s)
            name = s["metadata"]["labels"]["kustody.io/datakey"]
            records[name] = [(ks.encrypt(f"{name} before".encode()), f"{name} before".encode())]
        # A second generation for every DataKey, then a rotation (every generation re-wrapped).
        assert kustody_cli(plane, "rotate", RING).returncode == 0
        plane.kubectl(
            "annotate", "datakeys", "--all", "-n", NS, "--overwrite",
            "kustody.io/regenerate-requested-at=2026-12-02T00:00:00Z",
        )  # fmt: skip
        eventually(lambda: _settled(plane, 2, 2), 120, "two generations each, under v2")
        before: dict[str, dict[int, bytes]] = {}
        for s in _items(plane, "secrets"):
            ks, deks = _open_keyset(stack.socket, s)
            name = s["metadata"]["labels"]["kustody.io/datakey"]
            before[name] = deks
            records[name].append((ks.encrypt(f"{name} after".encode()), f"{name} after".encode()))
        old = {d["metadata"]["name"]: d for d in _items(plane, "datakeys")}
        old_ring = get(plane, "keyring", RING) or {}

        result = kustody_cli(plane, "backup", "export", "-o", str(backup_file))
        assert result.returncode == 0, result.stderr
        assert f"exported {N} DataKey(s), {2 * N} generation(s)" in result.stderr
        text = backup_file.read_text()
        assert backup_file.stat().st_mode & 0o077 == 0
        # Leak scan: no DEK appears in the backup in any encoding.
        for deks in before.values():
            for dek in deks.values():
                for form in (dek.hex(), base64.b64encode(dek).decode(), dek.decode("latin-1")):
                    assert form not in text
    finally:
        operator.stop()
        first.close()

    # The control plane's state is gone entirely: etcd's data, certificates, kubeconfig.
    shutil.rmtree(first_dir)
    assert not first_dir.exists()

    second = isolated_plane(kube, tmp_path / "plane-2")
    plane = next(second)
    operator = Operator(tmp_path / "op-2", plane, stack.socket, name="drill-op-2")
    try:
        assert get(plane, "datakey", "dk-0", NS) is None
        operator.start().wait_active()
        # Restore first, then let Git apply the declarations.
        result = kustody_cli(plane, "backup", "restore", str(backup_file))
        assert result.returncode == 0, result.stderr
        assert f"restored {N} DataKey Secret(s)" in result.stderr
        plane.kubectl("apply", "--server-side", "-f", "-", input=_declarations())
        eventually(lambda: _settled(plane, 2, 2), 120, "every DataKey adopted and Ready")

        ring = get(plane, "keyring", RING) or {}
        assert [(v["version"], v["fingerprint"]) for v in ring["status"]["versions"]] == [
            (v["version"], v["fingerprint"]) for v in old_ring["status"]["versions"]
        ]
        reasons = _reasons(plane)
        secrets = {
            s["metadata"]["labels"]["kustody.io/datakey"]: s for s in _items(plane, "secrets")
        }
        for dk in _items(plane, "datakeys"):
            name = dk["metadata"]["name"]
            assert dk["metadata"]["uid"] != old[name]["metadata"]["uid"]
            assert "Adopted" in reasons[name], reasons[name]
            assert "Created" not in reasons[name], reasons[name]
            assert "Regenerated" not in reasons[name], reasons[name]
            assert [
                (g["generation"], g["keyId"], g["state"]) for g in dk["status"]["generations"]
            ] == [
                (g["generation"], g["keyId"], g["state"])
                for g in old[name]["status"]["generations"]
            ]
            secret = secrets[name]
            assert secret["metadata"]["ownerReferences"][0]["uid"] == dk["metadata"]["uid"]
            assert "kustody.io/restored-from-backup" not in secret["metadata"].get(
                "annotations", {}
            )
            keys, deks = _open_keyset(stack.socket, secret)
            assert deks == before[name]  # the very same DEKs, every generation
            for ciphertext, plaintext in records[name]:
                assert keys.decrypt(ciphertext) == plaintext

        # A Secret that is not this DataKey's (another DataKey's keyset, relabelled) is
        # verified by the sidecar, refused, and no key is generated for the DataKey.
        stolen = json.loads(json.dumps(secrets["dk-0"]))
        stolen["metadata"] = {
            "name": "intruder-dek",
            "namespace": NS,
            "labels": {**stolen["metadata"]["labels"], "kustody.io/datakey": "intruder"},
        }
        plane.kubectl("apply", "-f", "-", input=json.dumps(stolen))
        plane.kubectl(
            "apply", "-f", "-",
            input=json.dumps({
                "apiVersion": "kustody.io/v1alpha1", "kind": "DataKey",
                "metadata": {"name": "intruder", "namespace": NS},
                "spec": {"keyRingRef": {"name": RING}, "secretName": "intruder-dek",
                         "encryptionContext": {"app": "app-0"}},
            }),
        )  # fmt: skip
        refused = eventually(
            lambda: (
                (o := get(plane, "datakey", "intruder", NS))
                and condition(o, "Ready").get("reason") == "AdoptionRefused"
                and o
            ),
            60,
            "the foreign Secret refused",
        )
        assert "AAD_MISMATCH" in condition(refused, "Ready")["message"]
        assert not (refused.get("status") or {}).get("generations")
        assert "ownerReferences" not in (get(plane, "secret", "intruder-dek", NS) or {})["metadata"]
    finally:
        operator.stop()
        second.close()
