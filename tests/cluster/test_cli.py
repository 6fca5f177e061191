"""The operator-facing commands on the real stack: status, rotate, rewrap, restore and doctor,
in every output format, directly and as ``kubectl kustody`` through the real kubectl.

JSON and YAML are validated against the schemas shipped in the package (the ones docs/cli.md
documents). The doctor's failures (a stopped sidecar and operator, a deleted CRD, a removed
RBAC rule, an expired certificate, KeyRings in trouble) are made on a control plane of their
own, so the session's operator is not disturbed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import json
import os
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kustody.cli.output import schema
from kustody.cli.rbac import Permission, operator_permissions
from kustody.dev.controlplane import Cluster
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody_helpers import (
    apply,
    datakey,
    eventually,
    get,
    isolated_plane,
    keyring,
    policy,
    ready,
    ready_datakey,
)

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = Path(sys.executable).parent  # .venv/bin: kustody and kubectl-kustody


def _validate(text: str, kind: str, fmt: str = "json") -> dict[str, Any]:
    data: dict[str, Any] = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    jsonschema.validate(data, schema(kind))
    assert data["apiVersion"] == "kustody.io/cli/v1"
    assert data["kind"] == kind
    return data


def _cli(kube: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(SCRIPTS / "kustody"), *args, "--kubeconfig", str(kube.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _kubectl_env() -> dict[str, str]:
    env = {**os.environ, "PATH": f"{SCRIPTS}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("KUBECONFIG", None)
    return env


def _kubectl(kube: Cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The real kubectl binary, finding the plugin on PATH as it would for a user."""
    return subprocess.run(
        [str(kube.binaries.kubectl), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=_kubectl_env(),
    )


# -- the session's operator ------------------------------------------------------------------


@dataclasses.dataclass
class Ring:
    name: str
    ns: str
    other_ns: str


@pytest.fixture
def ring(
    kube: Cluster, kube_namespace: str, kustody_operator: Operator, request: pytest.FixtureRequest
) -> Iterator[Ring]:
    """A KeyRing allowing two namespaces, with two DataKeys in the first and one in the other."""
    name = request.node.name.replace("_", "-")[:40].strip("-").lower()
    other = f"{kube_namespace}-b"
    kube.kubectl("create", "namespace", other)
    apply(kube, keyring(name, [kube_namespace, other]))
    eventually(lambda: ready(get(kube, "keyring", name)), 60, f"KeyRing {name} Ready")
    apply(kube, datakey("orders", kube_namespace, name, consumers=["orders-api", "billing"]))
    apply(kube, datakey("ledger", kube_namespace, name))
    apply(kube, datakey("audit", other, name))
    for ns, dk in ((kube_namespace, "orders"), (kube_namespace, "ledger"), (other, "audit")):
        ready_datakey(kube, dk, ns)
    eventually(
        lambda: sum(v["dataKeys"] for v in get(kube, "keyring", name)["status"]["versions"]) == 3,
        30,
        "the KeyRing to count its DataKeys",
    )
    yield Ring(name, kube_namespace, other)
    kube.kubectl("delete", "keyring", name, "--wait=false", check=False)
    kube.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_status_of_one_keyring_in_every_format(kube: Cluster, ring: Ring) -> None:
    result = _cli(kube, "status", ring.name, "-o", "json")
    assert result.returncode == 0, result.stderr
    report = _validate(result.stdout, "StatusReport")
    assert report["scope"] == {"keyRing": ring.name, "namespace": None, "allNamespaces": False}
    (kr,) = report["keyRings"]
    assert kr["name"] == ring.name
    assert kr["ready"]["status"] == "True"
    assert kr["primaryVersion"] == 1
    assert kr["versions"][0]["state"] == "Enabled"
    assert kr["versions"][0]["dataKeys"] == 3
    assert kr["dataKeys"] == {"total": 3, "notReady": 0}
    by_name = {(d["namespace"], d["name"]): d for d in report["dataKeys"]}
    assert set(by_name) == {(ring.ns, "orders"), (ring.ns, "ledger"), (ring.other_ns, "audit")}
    orders = by_name[(ring.ns, "orders")]
    assert orders["keyRingVersion"] == 1
    assert orders["generation"] == 1
    assert orders["secret"] == "orders-dek"
    assert sorted(orders["consumers"]) == ["billing", "orders-api"]
    assert orders["lastEvent"] is not None
    assert orders["lastEvent"]["reason"] == "Created"
    # Nothing secret: not even the wrapped key the DataKey's status carries.
    assert "kustody:v1:" not in result.stdout

    as_yaml = _cli(kube, "status", ring.name, "-o", "yaml")
    assert as_yaml.returncode == 0, as_yaml.stderr
    assert _validate(as_yaml.stdout, "StatusReport", "yaml")["dataKeys"] == report["dataKeys"]

    text = _cli(kube, "status", ring.name).stdout
    assert f"KeyRing {ring.name}: Ready=True (Ready), primary v1" in text
    assert "DataKeys: 3, not Ready: 0" in text
    header = next(line for line in text.splitlines() if line.startswith("NAMESPACE"))
    assert header.split() == [
        "NAMESPACE", "NAME", "READY", "KEYRING", "VERSION", "GENERATION", "SECRET", "CONSUMERS",
        "LAST", "EVENT",
    ]  # fmt: skip
    assert any(
        line.split()[:7] == [ring.ns, "orders", "True", ring.name, "1", "1", "orders-dek"]
        for line in text.splitlines()
    ), text
    wide = _cli(kube, "status", ring.name, "-o", "wide").stdout
    assert "LAST REWRAP" in wide
    assert "created " in wide


def test_status_of_a_namespace_and_of_all(kube: Cluster, ring: Ring) -> None:
    result = _cli(kube, "status", "-n", ring.ns, "-o", "json")
    assert result.returncode == 0, result.stderr
    report = _validate(result.stdout, "StatusReport")
    assert {d["name"] for d in report["dataKeys"]} == {"orders", "ledger"}
    assert [k["name"] for k in report["keyRings"]] == [ring.name]

    table = _cli(kube, "status", "-n", ring.ns).stdout
    lines = table.splitlines()
    assert lines[0].split()[:3] == ["NAME", "READY", "KEYRING"]
    assert any(line.startswith("orders ") and "orders-api,billing" in line for line in lines), table
    assert "Created (" in table

    everything = _validate(_cli(kube, "status", "-A", "-o", "json").stdout, "StatusReport")
    mine = {(d["namespace"], d["name"]) for d in everything["dataKeys"]}
    assert {(ring.ns, "orders"), (ring.other_ns, "audit")} <= mine

    overview = _validate(_cli(kube, "status", "-o", "json").stdout, "StatusReport")
    assert overview["dataKeys"] == []
    assert ring.name in {k["name"] for k in overview["keyRings"]}

    missing = _cli(kube, "status", "no-such-ring")
    assert missing.returncode == 1
    assert "KeyRing no-such-ring does not exist" in missing.stderr


def test_kubectl_plugin_through_the_real_kubectl(kube: Cluster, ring: Ring) -> None:
    kubeconfig = str(kube.kubeconfig)
    listed = _kubectl(kube, "plugin", "list")
    assert "kubectl-kustody" in listed.stdout, listed.stdout + listed.stderr

    result = _kubectl(kube, "kustody", "status", "-n", ring.ns, "-o", "json", "--kubeconfig",
                      kubeconfig)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert {d["name"] for d in _validate(result.stdout, "StatusReport")["dataKeys"]} == {
        "orders",
        "ledger",
    }

    # --context, as kubectl users pass it, and $KUBECONFIG instead of the flag.
    context = yaml.safe_load(kube.kubeconfig.read_text())["current-context"]
    env = {**_kubectl_env(), "KUBECONFIG": kubeconfig}
    by_context = subprocess.run(
        [str(kube.binaries.kubectl), "kustody", "status", ring.name, "--context", context],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert by_context.returncode == 0, by_context.stderr
    assert f"KeyRing {ring.name}: Ready=True" in by_context.stdout
    wrong = subprocess.run(
        [str(kube.binaries.kubectl), "kustody", "status", "--context", "no-such-context"],
        capture_output=True, text=True, timeout=60, check=False, env=env,
    )  # fmt: skip
    assert wrong.returncode == 1
    assert "no-such-context" in wrong.stderr

    help_text = _kubectl(kube, "kustody", "--help").stdout
    assert help_text.startswith("usage: kubectl kustody")

    rotated = _kubectl(kube, "kustody", "rotate", ring.name, "--wait", "--timeout", "90",
                       "--kubeconfig", kubeconfig, timeout=120)  # fmt: skip
    assert rotated.returncode == 0, rotated.stderr
    assert f"KeyRing {ring.name}: v2 is primary" in rotated.stdout
    assert f"3 DataKey(s) of {ring.name} wrapped under v2" in rotated.stdout
    assert "3/3" in rotated.stderr  # the progress, as plain lines off a terminal
    after = _validate(_cli(kube, "status", ring.name, "-o", "json").stdout, "StatusReport")
    assert {d["keyRingVersion"] for d in after["dataKeys"]} == {2}

    restored = _kubectl(kube, "kustody", "restore", ring.name, "1", "--kubeconfig", kubeconfig)
    assert restored.returncode == 0, restored.stderr
    assert f"restore of {ring.name} version(s) 1 requested" in restored.stdout
    annotations = get(kube, "keyring", ring.name)["metadata"]["annotations"]
    assert annotations["kustody.io/restore-versions"].startswith("1@")


def test_rewrap_shows_progress_and_stops_when_done_or_at_the_timeout(
    kube: Cluster, kube_namespace: str, kustody_operator: Operator
) -> None:
    ns = kube_namespace
    name = f"manual-{ns}"
    apply(kube, policy(f"{name}-p", rewrap="Manual"))
    apply(kube, keyring(name, [ns], policy=f"{name}-p"))
    eventually(lambda: ready(get(kube, "keyring", name)), 60, f"KeyRing {name} Ready")
    for dk in ("a", "b"):
        apply(kube, datakey(dk, ns, name))
        ready_datakey(kube, dk, ns)

    rotated = _cli(kube, "rotate", name, "--wait", "--timeout", "60")
    assert rotated.returncode == 0, rotated.stderr
    assert f"KeyRing {name}: v2 is primary" in rotated.stdout
    assert "rewrap: Manual" in rotated.stdout
    assert {get(kube, "datakey", dk, ns)["status"]["keyRingVersion"] for dk in "ab"} == {1}

    rewrapped = _cli(kube, "rewrap", name, "-n", ns, "--timeout", "60")
    assert rewrapped.returncode == 0, rewrapped.stderr
    assert "under its primary version v2 requested" in rewrapped.stdout
    assert f"2 DataKey(s) of {name} in {ns} wrapped under v2" in rewrapped.stdout
    assert "2/2" in rewrapped.stderr
    assert {get(kube, "datakey", dk, ns)["status"]["keyRingVersion"] for dk in "ab"} == {2}

    # A DataKey that cannot move (its namespace is not allowed): the wait ends at --timeout.
    kube.kubectl("patch", "keyring", name, "--type=merge", "-p",
                 json.dumps({"spec": {"allowedNamespaces": {"names": ["elsewhere"]}}}))  # fmt: skip
    apply(kube, datakey("stray", ns, name))
    stuck = _cli(kube, "rewrap", name, "-n", ns, "--timeout", "3")
    assert stuck.returncode == 1
    assert "timed out: 2 of 3 DataKeys re-wrapped" in stuck.stderr
    assert f"{ns}/stray" in stuck.stderr
    kube.kubectl("delete", "keyring", name, "--wait=false", check=False)


def test_doctor_on_a_working_cluster(
    kube: Cluster, kustody_operator: Operator, hsm_sidecar: Sidecar, ring: Ring
) -> None:
    result = _cli(kube, "doctor", "--hsm-socket", str(hsm_sidecar.socket), "-o", "json")
    report = _validate(result.stdout, "DoctorReport")
    assert result.returncode == report["exitCode"]
    status = {f["check"]: f["status"] for f in report["findings"]}
    assert status["crds"] == "ok"
    assert status["operator"] == "ok"
    assert status["sidecar"] == "ok", report
    assert status["rbac"] == "skipped"  # the session's operator runs as the admin here
    assert status["unwrap-cert"] == "skipped"
    sidecar = next(f for f in report["findings"] if f["check"] == "sidecar")
    assert "token present and logged in" in sidecar["message"]

    table = _kubectl(kube, "kustody", "doctor", "--hsm-socket", str(hsm_sidecar.socket),
                     "--kubeconfig", str(kube.kubeconfig))  # fmt: skip
    # Its own exit code, as its summary line says: other tests share this cluster, so a
    # DataKey of theirs may be not Ready in one run and Ready in the next.
    assert f"(exit {table.returncode})" in table.stdout
    assert "OK       crds" in table.stdout
    assert "SKIPPED  rbac" in table.stdout
    assert "fix: pass -n and --service-account" in table.stdout
    assert _validate(
        _cli(kube, "doctor", "--hsm-socket", str(hsm_sidecar.socket), "-o", "yaml").stdout,
        "DoctorReport",
        "yaml",
    )


# -- the doctor's failures, on a control plane of their own ------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _serving_cert(
    directory: Path, names: list[str], not_before: dt.datetime, not_after: dt.datetime
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kustody-unwrap")])
    sans: list[x509.GeneralName] = []
    for n in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            sans.append(x509.DNSName(n))
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "tls.crt", directory / "tls.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@dataclasses.dataclass
class Plane:
    kube: Cluster
    sidecar: Sidecar
    operator: Operator
    make_token: Callable[[str], SoftHSMToken]
    tmp: Path

    def doctor(self, *args: str) -> tuple[int, dict[str, Any]]:
        socket_args = [] if "--hsm-socket" in args else ["--hsm-socket", str(self.sidecar.socket)]
        result = _cli(self.kube, "doctor", *socket_args, "-o", "json", *args)
        assert result.stdout.startswith("{"), result.stderr
        report = _validate(result.stdout, "DoctorReport")
        assert result.returncode == report["exitCode"], result.stderr
        return result.returncode, report


def _findings(report: dict[str, Any], check: str, status: str | None = None) -> list[Any]:
    return [
        f
        for f in report["findings"]
        if f["check"] == check and (status is None or f["status"] == status)
    ]


@pytest.fixture(scope="module")
def plane(
    kube: Cluster,
    make_softhsm_token: Callable[[str], SoftHSMToken],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Plane]:
    tmp = tmp_path_factory.mktemp("doctor")
    gen = isolated_plane(kube, tmp / "plane")
    cluster = next(gen)
    token = make_softhsm_token("doctor")
    sidecar = Sidecar(tmp / "hsm", token).start()
    operator = Operator(tmp / "operator", cluster, sidecar.socket).start()
    try:
        operator.wait_active()
        apply(cluster, keyring("shop", ["default"]))
        eventually(lambda: ready(get(cluster, "keyring", "shop")), 60, "KeyRing shop Ready")
        apply(cluster, datakey("cart", "default", "shop"))
        ready_datakey(cluster, "cart", "default")
        yield Plane(cluster, sidecar, operator, make_softhsm_token, tmp)
    finally:
        operator.stop()
        sidecar.stop()
        gen.close()


def test_doctor_says_all_is_well_then_finds_a_removed_rbac_rule(plane: Plane) -> None:
    code, report = plane.doctor()
    assert code == 0, report
    assert {f["status"] for f in report["findings"]} <= {"ok", "skipped"}

    # The chart's RBAC for the operator's ServiceAccount, rendered by helm from the chart.
    kube = plane.kube
    kube.kubectl("create", "serviceaccount", "kustody", "-n", "kustody-system")
    rendered = kube.helm("template", "kustody", str(ROOT / "charts" / "kustody"),
                         "-n", "kustody-system", "-s", "templates/rbac.yaml").stdout  # fmt: skip
    apply(kube, rendered)
    code, report = plane.doctor()
    (rbac,) = _findings(report, "rbac")
    assert rbac["status"] == "ok", rbac
    assert "kustody-system/kustody may do all" in rbac["message"]

    role = json.loads(kube.kubectl("get", "clusterrole", "kustody", "-o", "json").stdout)
    role["rules"] = [r for r in role["rules"] if r["resources"] != ["events"]]
    for key in ("resourceVersion", "managedFields", "uid", "creationTimestamp"):
        role["metadata"].pop(key, None)
    kube.kubectl("replace", "-f", "-", input=json.dumps(role))
    code, report = plane.doctor()
    assert code == 2
    (missing,) = _findings(report, "rbac", "error")
    assert missing["message"] == "kustody-system/kustody may not create events"
    assert "rbac.yaml" in missing["fix"]


def test_doctor_checks_the_unwrap_certificate(plane: Plane) -> None:
    now = dt.datetime.now(dt.UTC)
    expired = _serving_cert(
        plane.tmp / "expired", ["localhost", "127.0.0.1"], now - dt.timedelta(days=30),
        now - dt.timedelta(hours=1),
    )  # fmt: skip
    listen = f"127.0.0.1:{_free_port()}"
    unwrap = Sidecar(
        plane.tmp / "unwrap-hsm",
        plane.make_token("unwrap"),
        workload_listen=listen,
        workload_tls_cert=expired[0],
        workload_tls_key=expired[1],
        kubeconfig=plane.kube.kubeconfig,
    ).start()
    try:
        code, report = plane.doctor("--unwrap-endpoint", listen)
        assert code == 2
        (cert,) = _findings(report, "unwrap-cert")
        assert cert["status"] == "error"
        assert "certificate expired" in cert["message"]
        assert cert["object"] == listen

        _, report = plane.doctor("--unwrap-endpoint", listen, "--unwrap-name",
                                 "kustody-unwrap.kustody-system.svc")  # fmt: skip
        messages = [f["message"] for f in _findings(report, "unwrap-cert", "error")]
        assert any("not kustody-unwrap.kustody-system.svc" in m for m in messages), messages
    finally:
        unwrap.stop()

    soon = _serving_cert(plane.tmp / "soon", ["kustody-unwrap.kustody-system.svc"],
                         now - dt.timedelta(days=1), now + dt.timedelta(days=5))  # fmt: skip
    code, report = plane.doctor("--unwrap-cert", str(soon[0]), "--unwrap-name",
                                "kustody-unwrap.kustody-system.svc")  # fmt: skip
    (cert,) = _findings(report, "unwrap-cert")
    assert cert["status"] == "warning"
    assert "expires" in cert["message"]


def test_doctor_finds_a_stopped_sidecar_then_a_stopped_operator(plane: Plane) -> None:
    plane.sidecar.stop()
    code, report = plane.doctor()
    assert code == 2
    (sidecar,) = _findings(report, "sidecar")
    assert sidecar["status"] == "error"
    assert "does not answer" in sidecar["message"]
    assert "start the sidecar" in sidecar["fix"]

    # A sidecar on another token: the KEKs it has are not the ones the status records.
    other = Sidecar(plane.tmp / "other-hsm", plane.make_token("other")).start()
    try:
        code, report = plane.doctor("--hsm-socket", str(other.socket))
        (mismatch,) = _findings(report, "sidecar")
        assert mismatch["status"] == "error"
        assert mismatch["message"].startswith("KeyRing shop v1: status fingerprint ")
        assert mismatch["message"].endswith(", token has no such version")
        assert mismatch["object"] == "keyring/shop"
    finally:
        other.stop()

    plane.operator.stop()
    code, report = plane.doctor()
    (lease,) = _findings(report, "operator")
    assert lease["status"] == "error"
    assert "kustody-system/kustody-operator" in lease["message"]


def test_doctor_finds_keyrings_in_trouble(plane: Plane) -> None:
    """With the operator stopped, the status is what this test writes."""
    plane.operator.stop()
    kube = plane.kube
    now = dt.datetime.now(dt.UTC)
    kr = get(kube, "keyring", "shop")
    versions = [dict(v) for v in kr["status"]["versions"]]
    versions.append(
        {
            "version": 9,
            "state": "DestroyScheduled",
            "fingerprint": "abcdef",
            "destroyAt": (now + dt.timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "dataKeys": 0,
        }
    )
    conditions = [
        {
            "type": "Ready",
            "status": "False",
            "reason": "HSMUnreachable",
            "message": "the HSM sidecar does not answer",
            "lastTransitionTime": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ]
    patch = {
        "status": {
            "versions": versions,
            "conditions": conditions,
            "nextRotationAt": "2020-01-01T00:00:00Z",
            "destructionImpact": [{"version": 9, "dataKeys": 1, "secrets": 1}],
        }
    }
    kube.kubectl("patch", "keyring", "shop", "--subresource=status", "--type=merge",
                 "-p", json.dumps(patch))  # fmt: skip
    code, report = plane.doctor()
    assert code == 2
    (not_ready,) = _findings(report, "keyrings", "error")
    assert not_ready["message"] == (
        "KeyRing shop is not Ready: HSMUnreachable: the HSM sidecar does not answer"
    )
    (destroy,) = _findings(report, "destruction", "warning")
    assert "KeyRing shop v9 will be destroyed in 1d" in destroy["message"]
    assert "1 DataKey(s) and 1 Secret(s) unreadable" in destroy["message"]
    assert destroy["fix"] == "if it is still needed: kustody restore shop 9"
    (overdue,) = _findings(report, "rotation", "warning")
    assert "rotation was due at 2020-01-01T00:00:00Z" in overdue["message"]

    table = _cli(kube, "doctor", "--hsm-socket", str(plane.sidecar.socket))
    assert table.returncode == 2
    assert "ERROR    keyrings     KeyRing shop is not Ready: HSMUnreachable" in table.stdout
    assert "WARNING  destruction" in table.stdout


def test_doctor_finds_a_deleted_crd(plane: Plane) -> None:
    plane.kube.kubectl("delete", "crd", "rotationpolicies.kustody.io")
    code, report = plane.doctor()
    assert code == 2
    (crd,) = _findings(report, "crds", "error")
    assert crd["message"] == "CRD rotationpolicies.kustody.io is not installed"
    assert "kubectl apply --server-side -f crds/" in crd["fix"]


def test_rbac_the_doctor_checks_is_the_chart_s(kube: Cluster) -> None:
    """kustody.cli.rbac lists exactly what charts/kustody grants the operator."""
    rendered = kube.helm("template", "kustody", str(ROOT / "charts" / "kustody"),
                         "-n", "kustody-system", "-s", "templates/rbac.yaml").stdout  # fmt: skip
    granted: set[Permission] = set()
    for doc in yaml.safe_load_all(rendered):
        if not doc or doc["kind"] not in ("ClusterRole", "Role"):
            continue
        if doc["metadata"]["name"].endswith("-unwrap"):
            continue  # the unwrap service's own identity, not the operator's
        for rule in doc["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    for verb in rule["verbs"]:
                        for name in rule.get("resourceNames") or [""]:
                            granted.add(
                                Permission(group, resource, verb, doc["kind"] == "Role", name)
                            )
    assert set(operator_permissions("kustody-operator")) == granted


def test_operator_metrics_listen_where_told(
    kube: Cluster, kustody_operator: Operator, hsm_sidecar: Sidecar, tmp_path: Path
) -> None:
    """--metrics-address: a standby replica (the session's operator holds the Lease) serves
    /metrics on 127.0.0.2 only."""
    port = _free_port()
    standby = Operator(
        tmp_path, kube, hsm_sidecar.socket, name="standby", metrics_port=port,
        extra_args=("--metrics-address", "127.0.0.2"),
    ).start()  # fmt: skip
    try:

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.2:{port}/metrics", timeout=2) as r:
                return str(r.read().decode())

        body = eventually(lambda: _or_none(scrape), 60, "/metrics on 127.0.0.2")
        assert "kustody_" in body
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        standby.stop()


def _or_none(call: Callable[[], str]) -> str | None:
    try:
        return call()
    except OSError:
        return None


def test_kubectl_completes_the_plugin(kube: Cluster) -> None:
    """kubectl's own completion asks kubectl_complete-kustody (installed beside the plugin)."""
    commands = _kubectl(kube, "__complete", "kustody", "re")
    assert commands.returncode == 0, commands.stderr
    assert commands.stdout.split() == ["restore", "rewrap", ":4"]
    formats = _kubectl(kube, "__complete", "kustody", "status", "-o", "")
    assert formats.stdout.split() == ["table", "wide", "json", "yaml", ":4"]
    flags = _kubectl(kube, "__complete", "kustody", "doctor", "--unwrap-")
    assert "--unwrap-endpoint" in flags.stdout.split()
