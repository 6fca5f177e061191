"""The operator end to end: real kube-apiserver, real sidecar, real SoftHSM2 token.

One operator runs for the module (the session ``kustody_operator`` fixture); each test uses
its own KeyRing and namespace so that tests do not depend on each other.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kustody.api.client import Binding, HsmClient, HsmError, Reason, VersionState
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Operator, Sidecar
from kustody_helpers import (
    apply,
    condition,
    datakey,
    eventually,
    expire_destruction,
    get,
    keyring,
    policy,
    ready,
    secret_data,
    unwrap,
)
from kustody_helpers import (
    describe as _describe,
)
from kustody_helpers import (
    event_reasons as _events,
)
from kustody_helpers import (
    kustody_cli as _kustody,
)
from kustody_helpers import (
    ready_datakey as _ready_dk,
)

pytestmark = pytest.mark.usefixtures("kustody_operator")

DEKS: list[bytes] = []  # every plaintext DEK seen, for the leak scan at the end


def _secret(kube: Cluster, name: str, ns: str) -> dict[str, Any] | None:
    return get(kube, "secret", name, ns)


@pytest.fixture
def ns(kube_namespace: str) -> str:
    return kube_namespace


@pytest.fixture
def ring(kube: Cluster, ns: str, request: pytest.FixtureRequest) -> Iterator[str]:
    """A KeyRing that allows ``ns``, named after the test."""
    name = request.node.name.replace("_", "-")[:40].strip("-").lower()
    apply(kube, keyring(name, [ns]))
    eventually(lambda: ready(get(kube, "keyring", name)), 60, f"KeyRing {name} to be Ready")
    yield name
    kube.kubectl("delete", "keyring", name, "--wait=false", check=False)


def test_datakey_gets_a_wrapped_key_in_an_owned_secret(
    kube: Cluster, ns: str, ring: str, hsm_sidecar: Sidecar
) -> None:
    apply(kube, datakey("orders", ns, ring, encryptionContext={"app": "orders"}))
    dk = _ready_dk(kube, "orders", ns)
    assert dk["status"]["keyRingVersion"] == 1
    assert dk["status"]["dekGeneration"] == 1
    assert dk["status"]["observedGeneration"] == dk["metadata"]["generation"]

    secret = _secret(kube, "orders-dek", ns)
    assert secret is not None
    assert secret["type"] == "kustody.io/wrapped-key"
    owner = secret["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["uid"]) == (
        "DataKey",
        "orders",
        dk["metadata"]["uid"],
    )
    labels = secret["metadata"]["labels"]
    assert labels["kustody.io/keyring"] == ring
    assert labels["kustody.io/keyring-version"] == "1"
    data = secret_data(secret)
    assert set(data) == {"wrapped-key", "key-ring", "key-version", "encryption-context", "keyset"}
    assert data["wrapped-key"].startswith("kustody:v1:")
    assert data["wrapped-key"] == dk["status"]["wrappedKey"]
    published = json.loads(data["keyset"])
    assert published["format"] == "kustody.io/wrapped-keyset/v1"
    (only,) = published["keys"]
    assert only["wrappedKey"] == data["wrapped-key"]
    assert only["status"] == "Primary"
    assert only["keyId"] == published["primaryKeyId"] == dk["status"]["generations"][0]["keyId"]
    assert json.loads(data["encryption-context"]) == {
        "keyRing": ring,
        "namespace": ns,
        "dataKey": "orders",
        "encryptionContext": {"app": "orders"},
    }

    dek = unwrap(hsm_sidecar.socket, secret)
    assert len(dek) == 32
    DEKS.append(dek)

    # The envelope is bound to where it belongs: another namespace or context does not open it.
    async def elsewhere(binding: Binding) -> None:
        async with HsmClient.unix(hsm_sidecar.socket) as hsm:
            await hsm.decrypt(data["wrapped-key"], binding, allow_plaintext_export=True)

    for binding in (Binding("other", "orders", {"app": "orders"}), Binding(ns, "orders", {})):
        with pytest.raises(HsmError) as err:
            asyncio.run(elsewhere(binding))
        assert err.value.reason is Reason.AAD_MISMATCH

    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", ring)) and o["status"]["versions"][0]["dataKeys"] == 1 and o
        ),
        30,
        "the KeyRing to count its DataKey",
    )
    assert condition(kr, "Rotating")["reason"] == "UpToDate"
    assert "Created" in _events(kube, ns, "orders")
    columns = kube.kubectl("get", "datakey", "orders", "-n", ns).stdout
    assert "True" in columns.splitlines()[1]


def test_namespace_not_allowed_makes_no_key(kube: Cluster, ns: str, ring: str) -> None:
    other = f"{ns}-x"
    kube.kubectl("create", "namespace", other)
    try:
        apply(kube, datakey("intruder", other, ring))
        dk = eventually(
            lambda: (
                condition(get(kube, "datakey", "intruder", other), "Ready").get("reason")
                == "NamespaceNotAllowed"
                and get(kube, "datakey", "intruder", other)
            ),
            30,
            "NamespaceNotAllowed",
        )
        assert condition(dk, "Ready")["status"] == "False"
        assert "wrappedKey" not in dk.get("status", {})
        assert _secret(kube, "intruder-dek", other) is None
        assert "NamespaceNotAllowed" in _events(kube, other, "intruder")
    finally:
        kube.kubectl("delete", "namespace", other, "--wait=false")


def test_namespace_selector_allows_labelled_namespaces(kube: Cluster, ns: str) -> None:
    name = f"sel-{ns}"
    apply(kube, keyring(name, [], allowedNamespaces={"selector": {"matchLabels": {"team": ns}}}))
    apply(kube, datakey("labelled", ns, name))
    eventually(
        lambda: (
            condition(get(kube, "datakey", "labelled", ns), "Ready").get("reason")
            == "NamespaceNotAllowed"
        ),
        30,
        "the unlabelled namespace to be refused",
    )
    kube.kubectl("label", "namespace", ns, f"team={ns}")
    _ready_dk(kube, "labelled", ns)
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_missing_keyring_waits_and_recovers(kube: Cluster, ns: str) -> None:
    name = f"late-{ns}"
    apply(kube, datakey("early", ns, name))
    eventually(
        lambda: (
            condition(get(kube, "datakey", "early", ns), "Ready").get("reason") == "KeyRingNotFound"
        ),
        30,
        "KeyRingNotFound",
    )
    assert _secret(kube, "early-dek", ns) is None
    apply(kube, keyring(name, [ns]))
    _ready_dk(kube, "early", ns)
    assert _secret(kube, "early-dek", ns) is not None
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_existing_secret_is_never_overwritten(kube: Cluster, ns: str, ring: str) -> None:
    kube.kubectl("-n", ns, "create", "secret", "generic", "taken-dek", "--from-literal=mine=1")
    apply(kube, datakey("taken", ns, ring))
    dk = eventually(
        lambda: (
            (o := get(kube, "datakey", "taken", ns))
            and condition(o, "Ready").get("reason") == "SecretConflict"
            and o
        ),
        30,
        "SecretConflict",
    )
    assert "taken-dek" in condition(dk, "Ready")["message"]
    secret = _secret(kube, "taken-dek", ns)
    assert secret is not None
    assert secret_data(secret) == {"mine": "1"}
    assert "ownerReferences" not in secret["metadata"]


def test_deleted_or_edited_secret_is_restored(
    kube: Cluster, ns: str, ring: str, hsm_sidecar: Sidecar
) -> None:
    apply(kube, datakey("drift", ns, ring))
    _ready_dk(kube, "drift", ns)
    original = secret_data(_secret(kube, "drift-dek", ns) or {})
    dek = unwrap(hsm_sidecar.socket, _secret(kube, "drift-dek", ns) or {})

    kube.kubectl("-n", ns, "delete", "secret", "drift-dek")
    restored = eventually(lambda: _secret(kube, "drift-dek", ns), 30, "the Secret to come back")
    assert secret_data(restored) == original

    kube.kubectl(
        "-n", ns, "patch", "secret", "drift-dek", "--type=merge",
        "-p", json.dumps({"data": {"wrapped-key": "Z2FyYmFnZQ==", "extra": "eA=="}}),
    )  # fmt: skip
    eventually(
        lambda: secret_data(_secret(kube, "drift-dek", ns) or {}) == original,
        30,
        "the edited Secret to be restored",
    )
    assert unwrap(hsm_sidecar.socket, _secret(kube, "drift-dek", ns) or {}) == dek
    assert "SecretRestored" in _events(kube, ns, "drift")


def test_rotation_rewraps_without_restarting_workloads(
    kube: Cluster, ns: str, ring: str, hsm_sidecar: Sidecar
) -> None:
    _deployment(kube, ns, "api", restart_by="rot")
    apply(
        kube,
        datakey("rot", ns, ring, rolloutRestartTargets=[{"kind": "Deployment", "name": "api"}]),
    )
    _ready_dk(kube, "rot", ns)
    dek = unwrap(hsm_sidecar.socket, _secret(kube, "rot-dek", ns) or {})
    DEKS.append(dek)

    result = _kustody(kube, "rotate", ring)
    assert result.returncode == 0, result.stderr
    assert "rotation of KeyRing" in result.stdout

    kr = eventually(
        lambda: (o := get(kube, "keyring", ring)) and o["status"].get("primaryVersion") == 2 and o,
        30,
        "version 2 to become primary",
    )
    assert kr["status"]["lastRotationReason"] == "Requested"
    assert [v["state"] for v in kr["status"]["versions"]] == ["Enabled", "Enabled"]
    dk = eventually(
        lambda: (o := get(kube, "datakey", "rot", ns)) and o["status"]["keyRingVersion"] == 2 and o,
        30,
        "the DataKey to be re-wrapped under version 2",
    )
    assert dk["status"]["dekGeneration"] == 1
    assert "lastRewrapAt" in dk["status"]
    secret = eventually(
        lambda: (s := _secret(kube, "rot-dek", ns)) and secret_data(s)["key-version"] == "2" and s,
        30,
        "the Secret to carry version 2",
    )
    assert unwrap(hsm_sidecar.socket, secret) == dek  # same DEK, new wrapping
    assert "Rewrapped" in _events(kube, ns, "rot")
    eventually(
        lambda: condition(get(kube, "keyring", ring), "Rotating").get("reason") == "UpToDate",
        30,
        "Rotating to settle",
    )
    deployment = get(kube, "deployment", "api", ns) or {}
    assert "dk.kustody.io/rot" not in (
        deployment["spec"]["template"]["metadata"].get("annotations") or {}
    )
    assert deployment["metadata"]["generation"] == 1

    status = _kustody(kube, "status")
    assert status.returncode == 0, status.stderr
    assert f"KeyRing {ring}: Ready=True" in status.stdout
    assert "primary v2" in status.stdout


def test_regeneration_restarts_targets_once_per_generation(
    kube: Cluster, ns: str, ring: str, hsm_sidecar: Sidecar
) -> None:
    _deployment(kube, ns, "worker", restart_by="other-key, regen")
    # Listed as a target by the DataKey but not opted in: never restarted (a tenant who may
    # write DataKeys must not be able to restart any workload of the namespace).
    _deployment(kube, ns, "bystander")
    _deployment(kube, ns, "elsewhere", restart_by="other-key")
    apply(
        kube,
        datakey(
            "regen", ns, ring, regenerateAfter="8760h",
            rolloutRestartTargets=[
                {"kind": "Deployment", "name": "worker"},
                {"kind": "Deployment", "name": "bystander"},
                {"kind": "Deployment", "name": "elsewhere"},
            ],
        ),
    )  # fmt: skip
    _ready_dk(kube, "regen", ns)
    first = unwrap(hsm_sidecar.socket, _secret(kube, "regen-dek", ns) or {})
    assert (get(kube, "deployment", "worker", ns) or {})["metadata"]["generation"] == 1

    # Pretend a year has passed: the key material was generated long ago.
    kube.kubectl(
        "-n", ns, "patch", "datakey", "regen", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"lastGeneratedAt": "2020-01-01T00:00:00Z"}}),
    )  # fmt: skip
    dk = eventually(
        lambda: (
            (o := get(kube, "datakey", "regen", ns)) and o["status"]["dekGeneration"] == 2 and o
        ),
        30,
        "a new DEK generation",
    )
    secret = eventually(
        lambda: (
            (s := _secret(kube, "regen-dek", ns))
            and s["metadata"]["annotations"].get("kustody.io/dek-generation") == "2"
            and s
        ),
        30,
        "the Secret to carry generation 2",
    )
    second = unwrap(hsm_sidecar.socket, secret)
    DEKS.extend([first, second])
    assert second != first
    assert dk["status"]["lastGeneratedAt"] != "2020-01-01T00:00:00Z"
    deployment = eventually(
        lambda: (
            (d := get(kube, "deployment", "worker", ns))
            and (d["spec"]["template"]["metadata"].get("annotations") or {}).get(
                "dk.kustody.io/regen"
            )
            == "2"
            and d
        ),
        30,
        "the Deployment to be restarted",
    )
    assert deployment["metadata"]["generation"] == 2
    assert "RolloutRestartTriggered" in _events(kube, ns, "regen")
    eventually(
        lambda: "RolloutTargetNotOptedIn" in _events(kube, ns, "regen"), 30, "the refusal Event"
    )
    for bystander in ("bystander", "elsewhere"):
        workload = get(kube, "deployment", bystander, ns) or {}
        assert workload["metadata"]["generation"] == 1, bystander
        assert "dk.kustody.io/regen" not in (
            workload["spec"]["template"]["metadata"].get("annotations") or {}
        )

    # Any further pass (a label, a resync) must not restart it again for the same generation.
    kube.kubectl("-n", ns, "label", "datakey", "regen", "poke=1")
    kube.kubectl("-n", ns, "annotate", "secret", "regen-dek", "poke=1")
    eventually(
        lambda: (
            (s := _secret(kube, "regen-dek", ns)) is not None and s["metadata"]["resourceVersion"]
        ),
        10,
    )
    time.sleep(3)
    assert (get(kube, "deployment", "worker", ns) or {})["metadata"]["generation"] == 2


def test_plaintext_export_only_where_the_keyring_allows(
    kube: Cluster, ns: str, hsm_sidecar: Sidecar
) -> None:
    closed, open_ = f"closed-{ns}", f"open-{ns}"
    apply(kube, keyring(closed, [ns]))
    apply(kube, keyring(open_, [ns], allowPlaintextExport=True))
    apply(kube, datakey("refused", ns, closed, exposePlaintext=True))
    apply(kube, datakey("exported", ns, open_, exposePlaintext=True))

    eventually(
        lambda: (
            condition(get(kube, "datakey", "refused", ns), "Ready").get("reason")
            == "PlaintextExportNotAllowed"
        ),
        30,
        "PlaintextExportNotAllowed",
    )
    assert _secret(kube, "refused-dek", ns) is None
    _ready_dk(kube, "exported", ns)
    secret = _secret(kube, "exported-dek", ns) or {}
    assert "plaintext-key" in secret["data"]
    plaintext = base64.b64decode(secret["data"]["plaintext-key"])
    assert plaintext == unwrap(hsm_sidecar.socket, secret)
    DEKS.append(plaintext)
    kube.kubectl("delete", "keyring", closed, open_, "--wait=false")


def test_retirement_never_touches_referenced_versions(
    kube: Cluster, ns: str, hsm_sidecar: Sidecar
) -> None:
    name, manual = f"ret-{ns}", f"man-{ns}"
    apply(kube, policy(f"auto-{ns}", retireAfter="0s", destroyAfter="24h"))
    apply(kube, policy(f"hold-{ns}", retireAfter="0s", destroyAfter="24h", rewrap="Manual"))
    apply(kube, keyring(name, [ns], policy=f"auto-{ns}"))
    apply(kube, keyring(manual, [ns], policy=f"hold-{ns}"))
    apply(kube, datakey("auto", ns, name))
    apply(kube, datakey("held", ns, manual))
    _ready_dk(kube, "auto", ns)
    _ready_dk(kube, "held", ns)
    for ring in (name, manual):
        assert _kustody(kube, "rotate", ring).returncode == 0

    # Automatic re-wrap moves the DataKey to v2, then v1 (unreferenced) is disabled and its
    # destruction scheduled with the policy's waiting period.
    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", name))
            and o["status"]["versions"][0]["state"] == "DestroyScheduled"
            and o
        ),
        180,  # generous: the session operator serves every test of the suite meanwhile
        "v1 to be retired and scheduled for destruction",
    )
    v1 = kr["status"]["versions"][0]
    assert v1["dataKeys"] == 0
    assert "disabledAt" in v1
    assert "destroyAt" in v1
    assert not kr["status"]["destructionImpact"]
    described = {v.ref.version: v.state for v in _describe(hsm_sidecar, name).versions}
    # The token keeps its own record of the scheduled destruction (its waiting period holds
    # even against a client that calls DestroyVersion directly).
    assert described == {1: VersionState.DESTROY_SCHEDULED, 2: VersionState.ENABLED}
    assert unwrap(hsm_sidecar.socket, _secret(kube, "auto-dek", ns) or {})

    # Manual re-wrap keeps the DataKey on v1: v1 must stay Enabled.
    held = eventually(
        lambda: (
            (o := get(kube, "keyring", manual)) and o["status"].get("primaryVersion") == 2 and o
        ),
        30,
    )
    assert held["status"]["versions"][0]["state"] == "Enabled"
    assert condition(held, "Rotating")["reason"] == "ManualRewrap"
    eventually(
        lambda: "RetirementBlocked" in _events(kube, "default", manual), 120, "RetirementBlocked"
    )
    assert unwrap(hsm_sidecar.socket, _secret(kube, "held-dek", ns) or {})

    # The waiting period ends (we move destroyAt into the past): v1 is destroyed for good.
    expire_destruction(kube, kr)
    eventually(
        lambda: get(kube, "keyring", name)["status"]["versions"][0]["state"] == "Destroyed",
        30,
        "v1 to be destroyed",
    )
    described = {v.ref.version: v.state for v in _describe(hsm_sidecar, name).versions}
    assert described[1] is VersionState.DESTROYED
    assert "Destroyed" in _events(kube, "default", name)
    assert unwrap(hsm_sidecar.socket, _secret(kube, "auto-dek", ns) or {})
    kube.kubectl("delete", "keyring", name, manual, "--wait=false")


def test_manual_rewrap_happens_on_request_then_the_old_version_retires(
    kube: Cluster, ns: str, hsm_sidecar: Sidecar
) -> None:
    name = f"manual-{ns}"
    apply(kube, policy(f"manual-{ns}", retireAfter="0s", destroyAfter="24h", rewrap="Manual"))
    apply(kube, keyring(name, [ns], policy=f"manual-{ns}"))
    apply(kube, datakey("later", ns, name))
    _ready_dk(kube, "later", ns)
    dek = unwrap(hsm_sidecar.socket, _secret(kube, "later-dek", ns) or {})
    assert _kustody(kube, "rotate", name).returncode == 0
    eventually(
        lambda: condition(get(kube, "keyring", name), "Rotating").get("reason") == "ManualRewrap",
        30,
        "the KeyRing to report the DataKey left behind",
    )
    assert (get(kube, "datakey", "later", ns) or {})["status"]["keyRingVersion"] == 1

    result = _kustody(kube, "rewrap", name)
    assert result.returncode == 0, result.stderr
    assert "re-wrap of KeyRing" in result.stdout
    eventually(
        lambda: (get(kube, "datakey", "later", ns) or {})["status"]["keyRingVersion"] == 2,
        30,
        "the requested re-wrap",
    )
    assert unwrap(hsm_sidecar.socket, _secret(kube, "later-dek", ns) or {}) == dek
    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", name))
            and o["status"]["versions"][0]["state"] == "DestroyScheduled"
            and o
        ),
        60,
        "v1, now unreferenced, to retire",
    )
    assert condition(kr, "Rotating")["reason"] == "UpToDate"
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_restore_cancels_a_scheduled_destruction(kube: Cluster, ns: str) -> None:
    name = f"undo-{ns}"
    apply(kube, policy(f"undo-{ns}", retireAfter="0s", destroyAfter="720h"))
    apply(kube, keyring(name, [ns], policy=f"undo-{ns}"))
    eventually(lambda: ready(get(kube, "keyring", name)), 30)
    assert _kustody(kube, "rotate", name).returncode == 0
    eventually(
        lambda: get(kube, "keyring", name)["status"]["versions"][0]["state"] == "DestroyScheduled",
        60,
        "v1 to be scheduled for destruction",
    )
    # The runbook: stop the policy from retiring it again (retireAfter "0s" would), then restore.
    apply(kube, policy(f"undo-{ns}", retireAfter="720h", destroyAfter="720h"))
    result = _kustody(kube, "restore", name, "1")
    assert result.returncode == 0, result.stderr
    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", name))
            and o["status"]["versions"][0]["state"] == "Enabled"
            and o
        ),
        30,
        "v1 to be Enabled again",
    )
    assert "restoredAt" in kr["status"]["versions"][0]
    assert "destroyAt" not in kr["status"]["versions"][0]
    assert "Restored" in _events(kube, "default", name)
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_deleted_keyring_with_retain_is_adopted_again(
    kube: Cluster, ns: str, hsm_sidecar: Sidecar
) -> None:
    name = f"keep-{ns}"
    apply(kube, keyring(name, [ns], deletionPolicy="Retain"))
    kr = eventually(lambda: (o := get(kube, "keyring", name)) and ready(o) and o, 30)
    fingerprint = kr["status"]["versions"][0]["fingerprint"]
    assert "kustody.io/keyring-protection" in kr["metadata"]["finalizers"]
    kube.kubectl("delete", "keyring", name, "--timeout=30s")
    assert get(kube, "keyring", name) is None
    assert [v.fingerprint for v in _describe(hsm_sidecar, name).versions] == [fingerprint]

    apply(kube, keyring(name, [ns], deletionPolicy="Retain"))
    again = eventually(lambda: (o := get(kube, "keyring", name)) and ready(o) and o, 30)
    assert again["status"]["versions"][0]["fingerprint"] == fingerprint
    assert "Adopted" in _events(kube, "default", name)
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_deleted_keyring_with_destroy_waits_then_destroys(
    kube: Cluster, ns: str, hsm_sidecar: Sidecar
) -> None:
    name = f"shred-{ns}"
    apply(kube, keyring(name, [ns], deletionPolicy="Destroy"))
    eventually(lambda: ready(get(kube, "keyring", name)), 30)
    kube.kubectl("delete", "keyring", name, "--wait=false")
    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", name))
            and o["status"]["versions"][0]["state"] == "DestroyScheduled"
            and o
        ),
        30,
        "deletion to schedule destruction",
    )
    assert condition(kr, "Ready")["reason"] == "Deleting"
    expire_destruction(kube, kr)
    eventually(lambda: get(kube, "keyring", name) is None, 30, "the KeyRing to be gone")
    assert [v.state for v in _describe(hsm_sidecar, name).versions] == [VersionState.DESTROYED]


def test_gitops_apply_twice_changes_nothing_and_spec_is_never_written(
    kube: Cluster, repo: Any
) -> None:
    examples = str(repo / "examples")
    kube.kubectl("apply", "--server-side", "-f", examples)
    _ready_dk(kube, "ledger", "payments")
    _ready_dk(kube, "card-vault", "payments")
    before = {k: get(kube, *k) for k in (("keyring", "payments"), ("rotationpolicy", "quarterly"))}
    kube.kubectl("apply", "--server-side", "-f", examples)
    diff = kube.kubectl("diff", "--server-side", "-f", examples, check=False)
    assert diff.returncode == 0, diff.stdout
    for key, obj in before.items():
        after = get(kube, *key) or {}
        assert after["metadata"]["generation"] == (obj or {})["metadata"]["generation"]
        assert after["spec"] == (obj or {})["spec"]
    for kind, name, namespace in (
        ("keyring", "payments", None),
        ("datakey", "ledger", "payments"),
        ("datakey", "card-vault", "payments"),
        ("rotationpolicy", "quarterly", None),
    ):
        obj = get(kube, kind, name, namespace) or {}
        for entry in obj["metadata"]["managedFields"]:
            if entry["manager"] != "kubectl":
                assert "f:spec" not in json.dumps(entry.get("fieldsV1", {})), (kind, entry)


def test_no_plaintext_key_in_logs_events_or_status(
    kube: Cluster, kustody_operator: Operator
) -> None:
    assert DEKS, "the tests above should have collected plaintext DEKs"
    haystacks = {
        "operator log": kustody_operator.log(),
        "events": kube.kubectl("get", "events", "-A", "-o", "json").stdout,
        "keyrings": kube.kubectl("get", "keyrings", "-o", "json").stdout,
        "datakeys": kube.kubectl("get", "datakeys", "-A", "-o", "json").stdout,
    }
    for dek in DEKS:
        needles = (dek.hex(), base64.b64encode(dek).decode(), dek.hex().upper())
        for where, text in haystacks.items():
            for needle in needles:
                assert needle not in text, f"a plaintext DEK appears in the {where}"


def _deployment(kube: Cluster, ns: str, name: str, *, restart_by: str | None = None) -> None:
    annotations = {"kustody.io/allow-rollout-restart": restart_by} if restart_by else {}
    apply(
        kube,
        json.dumps(
            {
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "annotations": annotations},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": name}},
                    "template": {
                        "metadata": {"labels": {"app": name}},
                        "spec": {"containers": [{"name": "app", "image": "busybox"}]},
                    },
                },
            }
        ),
    )
