"""What a tenant with rights only in its own namespace tries against KeyRings it does not own,
on the real stack (kube-apiserver, SoftHSM2, sidecar, operator).

The tenant acts through impersonation of its own ServiceAccount, which holds a Role in its
namespace only (create Secrets and DataKeys there), so every request is authorised as it.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kustody.api.client import VersionState
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Operator, Sidecar
from kustody.kube.api import Kube, load_api_client
from kustody.kube.resources import SECRETS
from kustody_helpers import (
    apply,
    condition,
    datakey,
    eventually,
    expire_destruction,
    get,
    isolated_plane,
    keyring,
    policy,
    ready,
    unwrap,
)
from kustody_helpers import describe as _describe
from kustody_helpers import event_reasons as _events
from kustody_helpers import kustody_cli as _kustody
from kustody_helpers import ready_datakey as _ready_dk

pytestmark = pytest.mark.usefixtures("kustody_operator")

FORGED_LABELS = {"app.kubernetes.io/managed-by": "kustody", "kustody.io/datakey": "x"}


def _tenant(kube: Cluster, namespace: str) -> str:
    """A ServiceAccount that may create Secrets and DataKeys in ``namespace`` only."""
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "tenant", "namespace": namespace},
        "rules": [
            {"apiGroups": [""], "resources": ["secrets"], "verbs": ["create", "get", "list"]},
            {"apiGroups": ["kustody.io"], "resources": ["datakeys"], "verbs": ["*"]},
        ],
    }
    binding = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "tenant", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "tenant"},
        "subjects": [{"kind": "ServiceAccount", "name": "tenant", "namespace": namespace}],
    }
    kube.kubectl("-n", namespace, "create", "serviceaccount", "tenant", check=False)
    for obj in (role, binding):
        apply(kube, json.dumps(obj))
    return f"system:serviceaccount:{namespace}:tenant"


def _forge(
    kube: Cluster, as_user: str | None, namespace: str, name: str, ring: str, version: int
) -> None:
    """A Secret carrying every label of a DataKey Secret of ``ring`` version ``version``."""
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                **FORGED_LABELS,
                "kustody.io/keyring": ring,
                "kustody.io/keyring-version": str(version),
            },
        },
        "data": {"wrapped-key": base64.b64encode(b"kustody:v1:forged").decode()},
    }
    identity = ["--as", as_user] if as_user else []
    kube.kubectl(*identity, "create", "-f", "-", input=json.dumps(secret))


@pytest.fixture
def tenant_ns(kube: Cluster) -> Iterator[str]:
    name = f"tenant-{os.urandom(3).hex()}"
    kube.kubectl("create", "namespace", name)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _versions(kube: Cluster, ring: str) -> list[str]:
    return [v["state"] for v in (get(kube, "keyring", ring) or {})["status"]["versions"]]


def test_forged_labels_do_not_hold_off_retirement_or_destruction(
    kube: Cluster, kube_namespace: str, tenant_ns: str, hsm_sidecar: Sidecar
) -> None:
    ns, name = kube_namespace, f"forged-{kube_namespace}"
    tenant = _tenant(kube, tenant_ns)
    apply(kube, policy(name, retireAfter="0s", destroyAfter="24h"))
    apply(kube, keyring(name, [ns], policy=name))
    apply(kube, datakey("real", ns, name))
    _ready_dk(kube, "real", ns)
    # Before the rotation: forged references to version 1 in the tenant's namespace (not
    # allowed by the KeyRing) and in the allowed namespace (a Secret no DataKey owns).
    _forge(kube, tenant, tenant_ns, "forged", name, 1)
    _forge(kube, None, ns, "stray", name, 1)
    assert _kustody(kube, "rotate", name).returncode == 0

    kr = eventually(
        lambda: (
            (o := get(kube, "keyring", name))
            and o["status"]["versions"][0]["state"] == "DestroyScheduled"
            and o
        ),
        120,  # generous: a busy 2-core machine; correctness, not speed, is asserted
        "v1 to retire on time despite the forged Secrets",
    )
    assert kr["status"]["versions"][0]["dataKeys"] == 0
    assert not kr["status"].get("destructionImpact")
    # (A RetirementBlocked right after the rotation, while the real DataKey was still being
    # re-wrapped, is expected; the forged Secrets never count.)
    expire_destruction(kube, kr)
    eventually(lambda: _versions(kube, name)[0] == "Destroyed", 30, "v1 to be destroyed on time")
    described = {v.ref.version: v.state for v in _describe(hsm_sidecar, name).versions}
    assert described[1] is VersionState.DESTROYED
    # The real DataKey was re-wrapped before anything was retired: it still decrypts.
    assert unwrap(hsm_sidecar.socket, get(kube, "secret", "real-dek", ns) or {})
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_forged_labels_do_not_re_enable_a_disabled_version(
    kube: Cluster, kube_namespace: str, tenant_ns: str, hsm_sidecar: Sidecar
) -> None:
    ns, name = kube_namespace, f"reenable-{kube_namespace}"
    tenant = _tenant(kube, tenant_ns)
    apply(kube, keyring(name, [ns]))  # no policy: nothing moves on its own
    apply(kube, datakey("real", ns, name))
    _ready_dk(kube, "real", ns)
    assert _kustody(kube, "rotate", name).returncode == 0
    eventually(
        lambda: (get(kube, "datakey", "real", ns) or {})["status"].get("keyRingVersion") == 2,
        30,
        "the DataKey to move to v2",
    )
    # The platform team disables v1 (nothing references it any more).
    kr = get(kube, "keyring", name) or {}
    versions = [dict(v) for v in kr["status"]["versions"]]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    versions[0].update(state="Disabled", disabledAt=now)
    kube.kubectl(
        "patch", "keyring", name, "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"versions": versions}}),
    )  # fmt: skip
    eventually(
        lambda: (
            {v.ref.version: v.state for v in _describe(hsm_sidecar, name).versions}[1]
            is VersionState.DISABLED
        ),
        30,
        "the token to disable v1",
    )

    _forge(kube, tenant, tenant_ns, "forged", name, 1)
    kube.kubectl("annotate", "keyring", name, "poke=1")  # make sure it reconciles again
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert _versions(kube, name)[0] == "Disabled"
        time.sleep(0.5)
    described = {v.ref.version: v.state for v in _describe(hsm_sidecar, name).versions}
    assert described[1] is VersionState.DISABLED
    assert "Restored" not in _events(kube, "default", name)
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_forged_labels_do_not_block_crypto_shredding(
    kube: Cluster, kube_namespace: str, tenant_ns: str, hsm_sidecar: Sidecar
) -> None:
    name = f"shred-forged-{kube_namespace}"
    tenant = _tenant(kube, tenant_ns)
    apply(kube, keyring(name, [kube_namespace], deletionPolicy="Destroy"))
    eventually(lambda: ready(get(kube, "keyring", name)), 30)
    _forge(kube, tenant, tenant_ns, "forged", name, 1)
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
    expire_destruction(kube, kr)
    eventually(lambda: get(kube, "keyring", name) is None, 30, "the KeyRing to be gone")
    assert [v.state for v in _describe(hsm_sidecar, name).versions] == [VersionState.DESTROYED]


def test_revoking_a_namespace_withdraws_plaintext_and_marks_not_ready(
    kube: Cluster, kube_namespace: str, hsm_sidecar: Sidecar
) -> None:
    ns, name = kube_namespace, f"revoke-{kube_namespace}"
    apply(kube, keyring(name, [ns], allowPlaintextExport=True))
    apply(kube, datakey("open", ns, name, exposePlaintext=True))
    _ready_dk(kube, "open", ns)
    secret = get(kube, "secret", "open-dek", ns) or {}
    assert "plaintext-key" in secret["data"]
    dek = unwrap(hsm_sidecar.socket, secret)

    # 1. The KeyRing stops allowing plaintext export: the entry leaves the Secret.
    apply(kube, keyring(name, [ns], allowPlaintextExport=False))
    eventually(
        lambda: (
            "plaintext-key" not in ((get(kube, "secret", "open-dek", ns) or {}).get("data"))
            and condition(get(kube, "datakey", "open", ns), "Ready").get("reason")
            == "PlaintextExportNotAllowed"
        ),
        30,
        "the plaintext entry to be withdrawn",
    )
    assert "PlaintextWithdrawn" in _events(kube, ns, "open")
    # No key is lost: the wrapped key is still there and still the same DEK.
    assert unwrap(hsm_sidecar.socket, get(kube, "secret", "open-dek", ns) or {}) == dek

    # 2. Back to allowed, then the namespace is removed from allowedNamespaces.
    apply(kube, keyring(name, [ns], allowPlaintextExport=True))
    eventually(
        lambda: "plaintext-key" in ((get(kube, "secret", "open-dek", ns) or {}).get("data")),
        30,
        "the plaintext entry to come back",
    )
    apply(kube, keyring(name, ["somewhere-else"], allowPlaintextExport=True))
    dk = eventually(
        lambda: (
            (o := get(kube, "datakey", "open", ns))
            and condition(o, "Ready").get("reason") == "NamespaceNotAllowed"
            and o
        ),
        30,
        "the DataKey to report the revocation",
    )
    assert condition(dk, "Ready")["status"] == "False"
    eventually(
        lambda: "plaintext-key" not in ((get(kube, "secret", "open-dek", ns) or {}).get("data")),
        30,
        "the plaintext entry to be withdrawn after the namespace was revoked",
    )
    assert unwrap(hsm_sidecar.socket, get(kube, "secret", "open-dek", ns) or {}) == dek
    kube.kubectl("delete", "keyring", name, "--wait=false")


def test_an_envelope_of_another_keyring_is_never_decrypted_for_export(
    kube: Cluster, kube_namespace: str, hsm_sidecar: Sidecar
) -> None:
    """A status.wrappedKey taken from a KeyRing without export must not be decrypted with the
    export permission of the KeyRing the spec names."""
    ns = kube_namespace
    closed, open_ = f"closed-{ns}", f"open-{ns}"
    apply(kube, keyring(closed, [ns]))
    apply(kube, keyring(open_, [ns], allowPlaintextExport=True))
    apply(kube, datakey("victim", ns, closed))
    victim = _ready_dk(kube, "victim", ns)
    envelope = victim["status"]["wrappedKey"]
    dek = unwrap(hsm_sidecar.socket, get(kube, "secret", "victim-dek", ns) or {})
    kube.kubectl("-n", ns, "delete", "datakey", "victim", "--wait=true")

    # Same namespace and name (so the AAD binding matches), now under the open KeyRing, with
    # the closed KeyRing's envelope written into its status before the operator gets to it.
    apply(kube, datakey("victim", ns, open_, exposePlaintext=True))
    kube.kubectl(
        "-n", ns, "patch", "datakey", "victim", "--subresource=status", "--type=merge",
        "-p", json.dumps({"status": {"wrappedKey": envelope, "keyRingVersion": 1}}),
    )  # fmt: skip
    dk = eventually(
        lambda: (
            (o := get(kube, "datakey", "victim", ns))
            and condition(o, "Ready").get("reason") in ("EnvelopeMismatch", "KeyAvailable")
            and o
        ),
        30,
        "the DataKey to settle",
    )
    secret = get(kube, "secret", "victim-dek", ns) or {}
    plaintexts = [base64.b64decode(secret.get("data", {}).get("plaintext-key", ""))]
    assert dek not in plaintexts, "the closed KeyRing's DEK was exported"
    if condition(dk, "Ready")["reason"] == "KeyAvailable":
        # The operator reached it before our status write: it generated its own key.
        assert dk["status"]["wrappedKey"] != envelope
    else:
        assert "neither decrypted nor re-wrapped" in condition(dk, "Ready")["message"]
        assert "EnvelopeMismatch" in _events(kube, ns, "victim")
    kube.kubectl("delete", "keyring", closed, open_, "--wait=false")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def lone_plane(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from isolated_plane(kube, tmp_path_factory.mktemp("flood"))


def test_operator_memory_stays_flat_with_500_large_labelled_secrets(
    lone_plane: Cluster, hsm_sidecar: Sidecar, tmp_path: Path
) -> None:
    cluster = lone_plane
    operator = Operator(tmp_path / "op", cluster, hsm_sidecar.socket, name="flood").start()
    try:
        operator.wait_active()
        assert operator.proc.popen is not None
        pid = operator.proc.popen.pid
        apply(cluster, keyring("flooded", ["flood"]))
        eventually(lambda: ready(get(cluster, "keyring", "flooded")), 60)
        time.sleep(2)
        before = _rss_mib(pid)

        cluster.kubectl("create", "namespace", "flood")
        payload = base64.b64encode(os.urandom(1000 * 1000)).decode()

        async def flood() -> None:
            kube = Kube(load_api_client(str(cluster.kubeconfig)), workers=8)
            try:
                gate = asyncio.Semaphore(8)

                async def one(i: int) -> None:
                    body = {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "metadata": {
                            "name": f"big-{i}",
                            "labels": {
                                **FORGED_LABELS,
                                "kustody.io/keyring": "flooded",
                                "kustody.io/keyring-version": "1",
                            },
                        },
                        "data": {"blob": payload},
                    }
                    async with gate:
                        await kube.create(SECRETS, body, "flood")

                await asyncio.gather(*(one(i) for i in range(500)))
            finally:
                kube.close()

        asyncio.run(flood())
        cluster.kubectl("annotate", "keyring", "flooded", "poke=1")
        time.sleep(10)  # the watch has delivered all 500 events (metadata only)
        after = _rss_mib(pid)
        print(f"operator RSS {before:.1f} MiB before, {after:.1f} MiB after 500 x 1 MiB Secrets")
        # 500 MiB of Secret data passed through the API server; the operator saw only
        # metadata. Old code held every Secret with its data (hundreds of MiB).
        assert after - before < 40, f"operator RSS grew from {before:.0f} to {after:.0f} MiB"
        assert ready(get(cluster, "keyring", "flooded"))
        status = (get(cluster, "keyring", "flooded") or {})["status"]
        assert status["versions"][0]["dataKeys"] == 0
    finally:
        operator.stop()
        cluster.kubectl("delete", "namespace", "flood", "--wait=false", check=False)
