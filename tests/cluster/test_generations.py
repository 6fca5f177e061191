"""No key, no data: a DataKey keeps its generations (real API server, sidecar, SoftHSM2).

Data a workload encrypted under an earlier generation stays readable after regeneration and
after KeyRing rotations; a generation leaves the keyset only through a staged removal that
spec.retention asks for, visible in the status and cancellable.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
from collections.abc import Mapping
from typing import Any

import jsonschema
import pytest
from kustody.api.client import Binding, HsmClient
from kustody.cli import output
from kustody.client.keyset import Keyset
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Sidecar
from kustody_helpers import (
    apply,
    condition,
    datakey,
    event_reasons,
    eventually,
    get,
    keyring,
    kustody_cli,
    ready,
    ready_datakey,
    secret_data,
)

pytestmark = pytest.mark.usefixtures("kustody_operator")


def _keyset_file(secret: Mapping[str, Any], socket: Any) -> bytes:
    """What `kustody unwrap` gives a workload: the keyset with every DEK, as JSON. Here the
    DEKs come from the sidecar's operator socket (the test is trusted like the operator)."""
    data = secret_data(secret)
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
    return json.dumps(
        {
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
    ).encode()


def _generations(kube: Cluster, name: str, ns: str) -> list[dict[str, Any]]:
    return list(
        ((get(kube, "datakey", name, ns) or {}).get("status") or {}).get("generations") or []
    )


def _regenerate(kube: Cluster, name: str, ns: str, stamp: str) -> None:
    """``kustody datakey regenerate`` (its stamp is the time; the tests' differ by name)."""
    del stamp
    result = kustody_cli(kube, "datakey", "regenerate", f"{ns}/{name}")
    assert result.returncode == 0, result.stderr
    assert "regeneration of DataKey" in result.stdout


def test_data_under_generation_one_survives_regeneration_and_rotation(
    kube: Cluster, kube_namespace: str, hsm_sidecar: Sidecar
) -> None:
    ns, ring = kube_namespace, f"gen-{kube_namespace}"
    apply(kube, keyring(ring, [ns]))
    apply(kube, datakey("app", ns, ring))
    ready_datakey(kube, "app", ns)
    first = Keyset.from_json(
        _keyset_file(get(kube, "secret", "app-dek", ns) or {}, hsm_sidecar.socket)
    )
    old_ciphertext = first.encrypt(b"written under generation 1", b"orders")

    _regenerate(kube, "app", ns, "2026-12-02T00:00:00Z")
    eventually(lambda: len(_generations(kube, "app", ns)) == 2, 30, "a second generation")
    secret = eventually(
        lambda: (
            (s := get(kube, "secret", "app-dek", ns))
            and len(json.loads(secret_data(s)["keyset"])["keys"]) == 2
            and s
        ),
        30,
        "the Secret to publish both generations",
    )
    second = Keyset.from_json(_keyset_file(secret, hsm_sidecar.socket))
    assert second.primary_key_id != first.primary_key_id
    assert second.decrypt(old_ciphertext, b"orders") == b"written under generation 1"
    new_ciphertext = second.encrypt(b"written under generation 2", b"orders")
    assert new_ciphertext[1:5] == second.primary_key_id.to_bytes(4, "big")
    states = [g["state"] for g in _generations(kube, "app", ns)]
    assert states == ["DecryptOnly", "Primary"]
    assert "Regenerated" in event_reasons(kube, ns, "app")
    # The wrapped-key entry single-key consumers read is the primary's.
    assert secret_data(secret)["wrapped-key"] == _generations(kube, "app", ns)[1]["wrappedKey"]

    # A KeyRing rotation re-wraps both generations; both still decrypt to the same DEKs.
    assert kustody_cli(kube, "rotate", ring).returncode == 0
    eventually(
        lambda: [g["keyRingVersion"] for g in _generations(kube, "app", ns)] == [2, 2],
        60,
        "both generations re-wrapped under v2",
    )
    rotated = eventually(
        lambda: (
            (s := get(kube, "secret", "app-dek", ns))
            and all(k["keyRingVersion"] == 2 for k in json.loads(secret_data(s)["keyset"])["keys"])
            and s
        ),
        30,
        "the Secret's keyset re-wrapped",
    )
    third = Keyset.from_json(_keyset_file(rotated, hsm_sidecar.socket))
    assert third.decrypt(old_ciphertext, b"orders") == b"written under generation 1"
    assert third.decrypt(new_ciphertext, b"orders") == b"written under generation 2"
    kr = get(kube, "keyring", ring) or {}
    assert [v["state"] for v in kr["status"]["versions"]] == ["Enabled", "Enabled"]
    kube.kubectl("delete", "keyring", ring, "--wait=false")


def test_a_keyring_version_wrapping_an_old_generation_is_never_retired(
    kube: Cluster, kube_namespace: str
) -> None:
    """Manual re-wrap holds the DataKey's generations on v1: the retiring policy must not
    disable v1 while any retained generation is wrapped under it."""
    ns, ring = kube_namespace, f"genret-{kube_namespace}"
    apply(kube, json.dumps({
        "apiVersion": "kustody.io/v1alpha1", "kind": "RotationPolicy",
        "metadata": {"name": ring},
        "spec": {"rotationPeriod": "2160h", "retireAfter": "0s", "destroyAfter": "24h",
                 "rewrap": "Manual"},
    }))  # fmt: skip
    apply(kube, keyring(ring, [ns], policy=ring))
    apply(kube, datakey("held", ns, ring))
    ready_datakey(kube, "held", ns)
    assert kustody_cli(kube, "rotate", ring).returncode == 0
    eventually(lambda: (get(kube, "keyring", ring) or {})["status"]["primaryVersion"] == 2, 30)
    # Regenerate: generation 2 is made under v2, generation 1 stays wrapped under v1.
    _regenerate(kube, "held", ns, "2026-12-02T01:00:00Z")
    eventually(
        lambda: [g["keyRingVersion"] for g in _generations(kube, "held", ns)] == [1, 2],
        30,
        "generation 2 under v2 beside generation 1 under v1",
    )
    eventually(lambda: "RetirementBlocked" in event_reasons(kube, "default", ring), 30, "the block")
    kr = get(kube, "keyring", ring) or {}
    assert kr["status"]["versions"][0]["state"] == "Enabled"
    assert kr["status"]["versions"][0]["dataKeys"] == 1
    kube.kubectl("delete", "keyring", ring, "--wait=false")


def test_staged_removal_is_visible_cancellable_and_happens_on_time(
    kube: Cluster, kube_namespace: str
) -> None:
    ns, ring = kube_namespace, f"genrm-{kube_namespace}"
    apply(kube, keyring(ring, [ns]))
    apply(kube, datakey("trim", ns, ring))
    ready_datakey(kube, "trim", ns)
    for i in range(2):
        _regenerate(kube, "trim", ns, f"2026-12-02T0{i}:00:00Z")
        eventually(lambda n=i: len(_generations(kube, "trim", ns)) == n + 2, 30)
    # Without retention nothing is scheduled, however many generations there are.
    assert all(g["state"] != "RemovalScheduled" for g in _generations(kube, "trim", ns))

    apply(kube, datakey("trim", ns, ring, retention={"keepGenerations": 2, "removalDelay": "1h"}))
    scheduled = eventually(
        lambda: (g := _generations(kube, "trim", ns)) and g[0]["state"] == "RemovalScheduled" and g,
        30,
        "generation 1 to be scheduled for removal",
    )
    assert "removeAt" in scheduled[0]
    assert [g["state"] for g in scheduled[1:]] == ["DecryptOnly", "Primary"]
    assert "GenerationRemovalScheduled" in event_reasons(kube, ns, "trim")

    listed = kustody_cli(kube, "datakey", "generations", f"{ns}/trim", "-o", "json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    jsonschema.validate(report, output.schema("GenerationsReport"))
    assert [g["state"] for g in report["generations"]] == [
        "RemovalScheduled", "DecryptOnly", "Primary",
    ]  # fmt: skip
    assert report["generations"][0]["removeAt"] == scheduled[0]["removeAt"]

    # Cancelled with the CLI: back to DecryptOnly, stays.
    kept = kustody_cli(kube, "datakey", "keep", f"{ns}/trim", "1")
    assert kept.returncode == 0, kept.stderr
    eventually(lambda: _generations(kube, "trim", ns)[0]["state"] == "DecryptOnly", 30, "cancel")
    assert "GenerationRemovalCancelled" in event_reasons(kube, ns, "trim")

    # Without the keep, it is scheduled again; when removeAt has come, it is removed.
    assert kustody_cli(kube, "datakey", "unkeep", f"{ns}/trim", "1").returncode == 0
    again = eventually(
        lambda: (g := _generations(kube, "trim", ns)) and g[0]["state"] == "RemovalScheduled" and g,
        30,
        "generation 1 scheduled again",
    )
    past = (dt.datetime.now(dt.UTC) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    again[0]["removeAt"] = past
    kube.kubectl(
        "-n", ns, "patch", "datakey", "trim", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"generations": again}}),
    )  # fmt: skip
    kube.kubectl("-n", ns, "annotate", "--overwrite", "datakey", "trim", "poke=1")
    eventually(
        lambda: [g["generation"] for g in _generations(kube, "trim", ns)] == [2, 3],
        30,
        "generation 1 removed",
    )
    secret = get(kube, "secret", "trim-dek", ns) or {}
    assert [k["generation"] for k in json.loads(secret_data(secret)["keyset"])["keys"]] == [2, 3]
    assert "GenerationRemoved" in event_reasons(kube, ns, "trim")
    assert ready(get(kube, "datakey", "trim", ns))
    kube.kubectl("delete", "keyring", ring, "--wait=false")


def test_an_old_format_datakey_is_adopted_with_the_same_dek(
    kube: Cluster, kube_namespace: str, hsm_sidecar: Sidecar
) -> None:
    """Status and Secret as the operator wrote them before generations existed."""
    ns, ring = kube_namespace, f"genup-{kube_namespace}"
    apply(kube, keyring(ring, [ns]))
    apply(kube, datakey("legacy", ns, ring))
    dk = ready_datakey(kube, "legacy", ns)
    wrapped = dk["status"]["wrappedKey"]
    before = Keyset.from_json(
        _keyset_file(get(kube, "secret", "legacy-dek", ns) or {}, hsm_sidecar.socket)
    )
    ciphertext = before.encrypt(b"old data")

    # Rewrite both to the old shape: no generations in the status, no keyset entry.
    kube.kubectl(
        "-n", ns, "patch", "datakey", "legacy", "--subresource=status", "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/status/generations"}]),
    )  # fmt: skip
    kube.kubectl(
        "-n", ns, "patch", "secret", "legacy-dek", "--type=json",
        "-p", json.dumps([{"op": "remove", "path": "/data/keyset"}]),
    )  # fmt: skip
    adopted = eventually(
        lambda: (g := _generations(kube, "legacy", ns)) and g,
        30,
        "the old status to be adopted as a generation",
    )
    assert [(g["generation"], g["state"], g["wrappedKey"]) for g in adopted] == [
        (1, "Primary", wrapped)
    ]
    secret = eventually(
        lambda: (s := get(kube, "secret", "legacy-dek", ns)) and "keyset" in s["data"] and s,
        30,
        "the keyset entry to be published",
    )
    after = Keyset.from_json(_keyset_file(secret, hsm_sidecar.socket))
    assert after.decrypt(ciphertext) == b"old data"
    assert after.primary_key_id == before.primary_key_id
    dk = get(kube, "datakey", "legacy", ns) or {}
    assert dk["status"]["dekGeneration"] == 1
    assert condition(dk, "Ready")["status"] == "True"
    kube.kubectl("delete", "keyring", ring, "--wait=false")
