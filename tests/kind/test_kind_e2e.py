"""End to end on kind, with pods: pytest-kind brings up a cluster (podman provider, a node
image built here from the pinned Kubernetes release, every image preloaded, nothing pulled)
configured by kind-config.yaml; helm installs the chart from this checkout with the image
from ``make image``; the examples become Ready; ``kustody rotate`` re-wraps; a workload's
init container unwraps its key through the Service DNS name with its projected token; a pod
in another namespace is refused; ``helm upgrade`` keeps the token and PINs; the Kustody pod
is deleted during a rotation of 200 DataKeys and comes back on the same volume with nothing
lost; ``helm uninstall`` keeps the CRDs and the token volume (a reinstall finds the same
KEKs); kube-apiserver encrypts Secrets at rest through Kustody's KMS v2 plugin.

The tests run in file order on one cluster: each builds on what the one before left.

    .venv/bin/pytest tests/kind --keep-cluster   # keep the cluster for a look afterwards
    KUBECONFIG=.pytest-kind/kustody-e2e/kubeconfig kubectl get pods -A
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kind_helpers import IMAGE, ROOT, eventually, run

pytestmark = [pytest.mark.kind, pytest.mark.timeout(3600)]

NAME = "kustody-e2e"
NODE = f"{NAME}-control-plane"
NS = "kustody-system"
N = int(os.environ.get("KIND_CRASH_N", "200"))


class Kind:
    """The cluster and the commands the tests run against it (as a user would type them)."""

    def __init__(self, cluster: Any, tools: dict[str, Any], state: Path) -> None:
        self.cluster = cluster
        self.kubeconfig = Path(cluster.kubeconfig_path).resolve()
        self.tools = tools
        self.state = state
        self.env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "HELM_CACHE_HOME": str(state / "helm" / "cache"),
            "HELM_CONFIG_HOME": str(state / "helm" / "config"),
            "HELM_DATA_HOME": str(state / "helm" / "data"),
        }

    @property
    def transcript(self) -> Path:
        return self.state / "transcript.md"

    def show(self, command: str, output: str) -> None:
        """Record a command and its real output for docs/kind.md (printed at the end)."""
        with self.transcript.open("a") as fh:
            fh.write(f"$ {command}\n{output.rstrip()}\n\n")

    def kubectl(self, *args: str, input: str | None = None, check: bool = True) -> str:
        proc = subprocess.run(
            [str(self.tools["kubectl"]), *args],
            input=input, capture_output=True, text=True, env=self.env, timeout=300,
        )  # fmt: skip
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", *args, "-o", "json"))

    def helm(self, *args: str) -> str:
        return run([str(self.tools["helm"]), *args], env=self.env, timeout=900)

    def kustody(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kustody", *args, "--kubeconfig", str(self.kubeconfig)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    def node(self, *args: str, input: str | None = None) -> str:
        return run(["podman", "exec", "-i", NODE, *args], input=input)

    def ready(self, *args: str) -> bool:
        try:
            obj = self.json(*args)
        except AssertionError:
            return False
        return _ready(obj)

    def kustody_pod(self) -> dict[str, Any]:
        pods = self.json("-n", NS, "pods", "-l", "app.kubernetes.io/component=operator")["items"]
        live = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
        assert len(live) == 1, [p["metadata"]["name"] for p in pods]
        return dict(live[0])

    def kustody_pod_ready(self) -> str | None:
        try:
            pod = self.kustody_pod()
        except AssertionError:
            return None
        return str(pod["metadata"]["name"]) if _ready(pod) else None


def _ready(obj: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (obj.get("status") or {}).get("conditions") or ()
    )


def _kind_config(kms_root: Path) -> Path:
    """kind-config.yaml as committed, with its host directories moved into this run's."""
    text = (ROOT / "kind-config.yaml").read_text().replace("/tmp/kustody-kind", str(kms_root))
    path = kms_root / "kind-config.yaml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def kind(
    request: pytest.FixtureRequest,
    kind_build: dict[str, Any],
    kind_network: str,
    kustody_image: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Kind]:
    from pytest_kind import KindCluster

    # State outside the checkout, stable across runs so that KUSTODY_KIND_REUSE=1 can run
    # later tests against a cluster kept by --keep-cluster.
    state = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kustody" / "e2e"
    reuse = os.environ.get("KUSTODY_KIND_REUSE") == "1"
    kind_bin = str(kind_build["kind"])
    clusters = run([kind_bin, "get", "clusters"]).split()
    reuse = reuse and NAME in clusters
    kms_root = state / "host"
    if not reuse:
        # A cluster left by an interrupted run would be reused by pytest-kind: start clean.
        if NAME in clusters:
            run([kind_bin, "delete", "cluster", "--name", NAME])
        shutil.rmtree(state, ignore_errors=True)
        (kms_root / "kms").mkdir(parents=True)
        (kms_root / "kms").chmod(0o777)  # the Kustody pod (uid 10001) creates kms.sock here
        (kms_root / "encryption-config.yaml").write_text(
            (ROOT / "docs" / "kind" / "encryption-config.yaml").read_text()
        )
    else:
        (state / "kubeconfig").write_text(run([kind_bin, "get", "kubeconfig", "--name", NAME]))
    cwd = Path.cwd()
    os.chdir(state)  # pytest-kind makes a .pytest-kind folder in the working directory
    try:
        cluster = KindCluster(
            NAME,
            kubeconfig=state / "kubeconfig",
            image=str(kind_build["node_image"]),
            kind_path=Path(kind_bin),
            kubectl_path=Path(kind_build["kubectl"]),
        )
    finally:
        os.chdir(cwd)
    started = time.monotonic()
    cluster.create(config_file=_kind_config(kms_root))
    took = time.monotonic() - started
    k = Kind(cluster, kind_build, state)
    k.show(
        f"KIND_EXPERIMENTAL_PROVIDER=podman kind create cluster --name {NAME} "
        f"--image {kind_build['node_image']} --config kind-config.yaml",
        f"({'reused' if reuse else 'created'} in {took:.0f}s)",
    )
    try:
        if not reuse:
            # Cluster DNS answers cluster names only: no forwarding anywhere (the network is
            # fenced anyway; this also makes unknown names fail at once, not time out).
            corefile = k.json("-n", "kube-system", "configmap", "coredns")["data"]["Corefile"]
            lines = corefile.splitlines()
            start = next(i for i, ln in enumerate(lines) if ln.strip().startswith("forward "))
            end = next(i for i in range(start, len(lines)) if lines[i].strip() == "}")
            patched = "\n".join(lines[:start] + lines[end + 1 :]) + "\n"
            k.kubectl(
                "-n", "kube-system", "patch", "configmap", "coredns", "--type=merge",
                "-p", json.dumps({"data": {"Corefile": patched}}),
            )  # fmt: skip
            archive = state / "kustody-image.tar"
            started = time.monotonic()
            run(["podman", "save", "--format", "docker-archive", "-o", str(archive), kustody_image])
            run([kind_bin, "load", "image-archive", str(archive), "--name", NAME])
            archive.unlink()
            k.show(
                f"podman save -o kustody.tar {kustody_image} && "
                f"kind load image-archive kustody.tar --name {NAME}",
                f"({time.monotonic() - started:.0f}s)",
            )
        yield k
    finally:
        print(f"\n--- transcript ({k.transcript}) ---\n{k.transcript.read_text()}")
        if not request.config.getoption("keep_cluster"):
            cluster.delete()


def _unwrap_tls(directory: Path) -> dict[str, Path]:
    """A CA and a serving certificate for kustody-unwrap.kustody-system.svc."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kustody-unwrap-ca")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    names = ["kustody-unwrap", f"kustody-unwrap.{NS}", f"kustody-unwrap.{NS}.svc"]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[-1])]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    paths = {
        "ca": directory / "ca.crt",
        "cert": directory / "tls.crt",
        "key": directory / "tls.key",
    }
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _helm_values() -> list[str]:
    repo, tag = IMAGE.rsplit(":", 1)
    return [
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", "kms.enabled=true", "--set", "kms.keyRing=kubernetes-secrets",
        "--set", "unwrap.enabled=true", "--set", "unwrap.tlsSecret=kustody-unwrap-tls",
    ]  # fmt: skip


def _install(kind: Kind) -> str:
    out = kind.helm(
        "install", "kustody", str(ROOT / "charts" / "kustody"), "--namespace", NS,
        *_helm_values(), "--wait", "--timeout", "5m",
    )  # fmt: skip
    kind.kubectl("-n", NS, "rollout", "status", "deploy/kustody", "--timeout=300s")
    return out


def _fingerprints(kind: Kind, ring: str) -> dict[int, str]:
    status = kind.json("keyring", ring)["status"]
    return {v["version"]: v["fingerprint"] for v in status["versions"]}


def test_cluster_runs_pods_from_local_images_only(kind: Kind) -> None:
    nodes = kind.json("nodes")["items"]
    assert [n["metadata"]["name"] for n in nodes] == [NODE]
    assert _ready(nodes[0])
    info = nodes[0]["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3"
    eventually(
        lambda: all(
            p["status"]["phase"] == "Running" and _ready(p)
            for p in kind.json("-n", "kube-system", "pods")["items"]
        ),
        180,
        "every kube-system pod Running and Ready",
    )
    images = {c["image"] for p in kind.json("pods", "-A")["items"] for c in p["spec"]["containers"]}
    assert any("coredns" in i for i in images)
    assert any("kube-proxy" in i for i in images)
    # Nothing was pulled: every image came from the node image or `kind load`.
    events = kind.kubectl("get", "events", "-A", "--field-selector", "reason=Pulling")
    assert "Pulling" not in events


def test_helm_install_runs_operator_and_sidecar(
    kind: Kind, tmp_path_factory: pytest.TempPathFactory
) -> None:
    kind.kubectl("create", "namespace", NS)
    # hostPath (the KMS socket for kube-apiserver) is not allowed under "restricted"; every
    # container still runs restricted-compliant (docs/kind.md).
    kind.kubectl("label", "namespace", NS, "pod-security.kubernetes.io/enforce=privileged")
    tls = _unwrap_tls(tmp_path_factory.mktemp("unwrap-tls"))
    kind.state.joinpath("unwrap-ca.crt").write_bytes(tls["ca"].read_bytes())
    kind.kubectl(
        "-n", NS, "create", "secret", "tls", "kustody-unwrap-tls",
        f"--cert={tls['cert']}", f"--key={tls['key']}",
    )  # fmt: skip
    out = _install(kind)
    assert "STATUS: deployed" in out
    kind.show(
        "helm install kustody charts/kustody -n kustody-system --set image.repository="
        "localhost/kustody --set image.tag=dev --set image.pullPolicy=Never --set kms.enabled=true"
        " --set unwrap.enabled=true --set unwrap.tlsSecret=kustody-unwrap-tls --wait",
        "\n".join(out.splitlines()[:6]),
    )
    kind.show("kubectl -n kustody-system get pods,pvc", kind.kubectl("-n", NS, "get", "pods,pvc"))
    pod = kind.kustody_pod()
    assert _ready(pod)
    statuses = {c["name"]: c for c in pod["status"]["containerStatuses"]}
    assert set(statuses) == {"operator", "hsm"}
    assert all(c["ready"] for c in statuses.values())
    name = pod["metadata"]["name"]
    init_log = kind.kubectl("-n", NS, "logs", name, "-c", "init-token")
    assert "SoftHSM2 token kustody initialised" in init_log
    # The token lives on the PVC, written by uid 10001.
    claim = next(
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if v["name"] == "token"
    )
    assert kind.json("-n", NS, "pvc", claim)["status"]["phase"] == "Bound"
    owners = kind.kubectl(
        "-n", NS, "exec", name, "-c", "hsm", "--",
        "find", "/var/lib/kustody/tokens", "-type", "f", "-printf", "%U\n",
    ).split()  # fmt: skip
    assert owners
    assert set(owners) == {"10001"}
    kms_sock = kind.state / "host" / "kms" / "kms.sock"
    eventually(kms_sock.exists, 120, "the KMS plugin's socket on the host")


def test_examples_become_ready_with_secrets(kind: Kind) -> None:
    for example in ("rotationpolicy.yaml", "keyring.yaml", "datakeys.yaml"):
        kind.kubectl("apply", "--server-side", "-f", str(ROOT / "examples" / example))
    eventually(lambda: kind.ready("keyring", "payments"), 180, "KeyRing payments Ready")
    for dk in ("ledger", "card-vault"):
        eventually(lambda: kind.ready("-n", "payments", "datakey", dk), 180, f"{dk} Ready")  # noqa: B023
    ledger = kind.json("-n", "payments", "secret", "ledger-dek")
    assert "wrapped-key" in ledger["data"]
    card = kind.json("-n", "payments", "secret", "card-vault-dek")
    kind.show("kubectl get keyrings,datakeys -A", kind.kubectl("get", "keyrings,datakeys", "-A"))
    assert {"dek.wrapped", "dek.keyring", "dek.version"} <= set(card["data"])


def test_kustody_rotate_rewraps(kind: Kind) -> None:
    before = kind.json("-n", "payments", "secret", "ledger-dek")["data"]["wrapped-key"]
    result = kind.kustody("rotate", "payments")
    assert result.returncode == 0, result.stderr
    kind.show("kustody rotate payments", result.stdout + result.stderr)

    def rewrapped() -> bool:
        kr = kind.json("keyring", "payments")["status"]
        dks = kind.json("-n", "payments", "datakeys")["items"]
        return kr.get("primaryVersion") == 2 and all(
            (d.get("status") or {}).get("keyRingVersion") == 2 and _ready(d) for d in dks
        )

    eventually(rewrapped, 180, "payments at version 2 with every DataKey re-wrapped")
    kind.show("kustody status payments", kind.kustody("status", "payments").stdout)
    secret = kind.json("-n", "payments", "secret", "ledger-dek")
    assert secret["metadata"]["labels"]["kustody.io/keyring-version"] == "2"
    assert secret["data"]["wrapped-key"] != before


def _workload(kind: Kind, namespace: str) -> None:
    kind.kubectl(
        "-n", namespace, "create", "configmap", "kustody-unwrap-ca",
        f"--from-file=ca.crt={kind.state / 'unwrap-ca.crt'}",
    )  # fmt: skip
    manifest = (ROOT / "examples" / "workload" / "workload.yaml").read_text()
    manifest = manifest.replace("ghcr.io/kustody/kustody:0.1.0", IMAGE)
    kind.kubectl("apply", "--server-side", "-n", namespace, "-f", "-", input=manifest)


def _orders_pod(kind: Kind) -> dict[str, Any]:
    pods = kind.json("-n", "shop", "pods", "-l", "app.kubernetes.io/name=orders-api")["items"]
    live = [p for p in pods if not p["metadata"].get("deletionTimestamp") and _ready(p)]
    assert len(live) == 1
    return dict(live[0])


def _app_log(kind: Kind, pod: str, line: str) -> str:
    """The app container's log once it holds ``line`` (or, after the timeout, as it is)."""
    try:
        return str(
            eventually(
                lambda: (
                    (log := kind.kubectl("-n", "shop", "logs", pod, "-c", "app"))
                    and line in log
                    and log
                ),
                120,
                f"{line!r} in the app's log",
                every=1,
            )
        )
    except AssertionError:
        return kind.kubectl("-n", "shop", "logs", pod, "-c", "app", check=False)


def test_workload_init_container_unwraps_through_the_service_name(kind: Kind) -> None:
    kind.kubectl("create", "namespace", "shop")
    kind.kubectl(
        "label", "namespace", "shop", "kustody.io/keyring=payments", "kustody.io/unwrap=true"
    )
    _workload(kind, "shop")
    eventually(lambda: kind.ready("-n", "shop", "datakey", "orders"), 180, "DataKey orders")
    kind.kubectl("-n", "shop", "rollout", "status", "deploy/orders-api", "--timeout=300s")
    pod = _orders_pod(kind)
    name = pod["metadata"]["name"]
    init = pod["spec"]["initContainers"][0]
    env = {e["name"]: e.get("value") for e in init["env"]}
    assert env["KUSTODY_UNWRAP_ENDPOINT"] == f"kustody-unwrap.{NS}.svc:8443"
    # Ready is Running (no readiness probe): the app prints once Python has started and
    # encrypted, which on a loaded machine can be after the rollout is reported done.
    app_log = _app_log(kind, name, "encrypted order-")
    kind.show("kubectl -n shop get pods", kind.kubectl("-n", "shop", "get", "pods"))
    kind.show(
        "kubectl -n shop logs deploy/orders-api -c unwrap-key",
        kind.kubectl("-n", "shop", "logs", name, "-c", "unwrap-key"),
    )
    kind.show("kubectl -n shop logs deploy/orders-api -c app", app_log)
    assert "encrypted order-" in app_log, app_log
    # The key is in the memory volume only.
    mounts = kind.kubectl("-n", "shop", "exec", name, "-c", "app", "--", "cat", "/proc/mounts")
    assert any(
        line.split()[1] == "/run/keys" and line.split()[2] == "tmpfs"
        for line in mounts.splitlines()
    )
    # The sidecar served it: its audit line names the caller.
    hsm_log = kind.kubectl("-n", NS, "logs", kind.kustody_pod()["metadata"]["name"], "-c", "hsm")
    assert any("orders" in line and "shop" in line for line in hsm_log.splitlines()), hsm_log[
        -3000:
    ]


def test_a_pod_in_another_namespace_is_refused(kind: Kind) -> None:
    """A copy of the wrapped key in a namespace the KeyRing does not allow, read by a
    ServiceAccount of the same name: the unwrap service refuses it."""
    kind.kubectl("create", "namespace", "intruder")
    kind.kubectl("label", "namespace", "intruder", "kustody.io/unwrap=true")
    kind.kubectl("-n", "intruder", "create", "serviceaccount", "orders-api")
    data = kind.json("-n", "shop", "secret", "orders-dek")["data"]
    kind.kubectl(
        "apply", "-n", "intruder", "-f", "-",
        input=json.dumps(
            {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "orders-dek"},
             "data": data}
        ),
    )  # fmt: skip
    ca = kind.state.joinpath("unwrap-ca.crt").read_text()
    kind.kubectl(
        "-n", "intruder", "create", "configmap", "kustody-unwrap-ca", f"--from-literal=ca.crt={ca}"
    )
    workload = (ROOT / "examples" / "workload" / "workload.yaml").read_text()
    assert "kustody-unwrap.kustody-system.svc:8443" in workload
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "steal"},
        "spec": {
            "serviceAccountName": "orders-api",
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [
                {
                    "name": "unwrap",
                    "image": IMAGE,
                    "command": [
                        "kustody",
                        "unwrap",
                        "--secret-dir=/dk",
                        "--stdout",
                        "--encoding=hex",
                        "--attempts=1",
                    ],
                    "env": [
                        {
                            "name": "KUSTODY_UNWRAP_ENDPOINT",
                            "value": f"kustody-unwrap.{NS}.svc:8443",
                        },
                        {"name": "KUSTODY_UNWRAP_CA_FILE", "value": "/ca/ca.crt"},
                        {"name": "KUSTODY_UNWRAP_TOKEN_FILE", "value": "/token/token"},
                    ],
                    "volumeMounts": [
                        {"name": "dk", "mountPath": "/dk"},
                        {"name": "ca", "mountPath": "/ca"},
                        {"name": "token", "mountPath": "/token"},
                    ],
                }
            ],
            "volumes": [
                {"name": "dk", "secret": {"secretName": "orders-dek"}},
                {"name": "ca", "configMap": {"name": "kustody-unwrap-ca"}},
                {
                    "name": "token",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "kustody",
                                    "expirationSeconds": 3600,
                                    "path": "token",
                                }
                            }
                        ]
                    },
                },
            ],
        },
    }
    kind.kubectl("apply", "-n", "intruder", "-f", "-", input=json.dumps(pod))
    eventually(
        lambda: (
            kind.json("-n", "intruder", "pod", "steal")["status"]["phase"]
            in ("Failed", "Succeeded")
        ),
        180,
        "the intruder pod to finish",
    )
    phase = kind.json("-n", "intruder", "pod", "steal")["status"]["phase"]
    log = kind.kubectl("-n", "intruder", "logs", "steal")
    kind.show(f"kubectl -n intruder logs steal   # phase {phase}", log)
    assert phase == "Failed", log
    assert "PERMISSION_DENIED" in log or "NAMESPACE" in log or "refused" in log.lower(), log


def test_helm_upgrade_keeps_token_and_pins(kind: Kind) -> None:
    pins = kind.json("-n", NS, "secret", "kustody-pin")["data"]
    claim = kind.json("-n", NS, "pvc", "kustody-token")
    fingerprints = _fingerprints(kind, "payments")
    old_pod = kind.kustody_pod()["metadata"]["name"]
    kind.helm(
        "upgrade", "kustody", str(ROOT / "charts" / "kustody"), "--namespace", NS,
        *_helm_values(), "--set", "operator.logLevel=debug", "--wait", "--timeout", "5m",
    )  # fmt: skip
    kind.kubectl("-n", NS, "rollout", "status", "deploy/kustody", "--timeout=300s")
    new_pod = eventually(kind.kustody_pod_ready, 180, "the upgraded Kustody pod Ready")
    kind.show(
        "helm upgrade kustody charts/kustody -n kustody-system ... --set operator.logLevel=debug"
        " --wait; kubectl -n kustody-system logs deploy/kustody -c init-token",
        kind.kubectl("-n", NS, "logs", new_pod, "-c", "init-token"),
    )
    assert new_pod != old_pod
    assert kind.json("-n", NS, "secret", "kustody-pin")["data"] == pins
    after = kind.json("-n", NS, "pvc", "kustody-token")
    assert after["metadata"]["uid"] == claim["metadata"]["uid"]
    assert after["spec"]["volumeName"] == claim["spec"]["volumeName"]
    init_log = kind.kubectl("-n", NS, "logs", new_pod, "-c", "init-token")
    assert "already initialised" in init_log
    eventually(lambda: kind.ready("keyring", "payments"), 180, "payments Ready after upgrade")
    assert _fingerprints(kind, "payments") == fingerprints
    # The workload restarts and unwraps again with the same token: it reads what it wrote.
    kind.kubectl("-n", "shop", "rollout", "restart", "deploy/orders-api")
    kind.kubectl("-n", "shop", "rollout", "status", "deploy/orders-api", "--timeout=300s")
    pod = eventually(lambda: _orders_pod(kind), 120, "orders-api Ready after restart")
    log = _app_log(kind, pod["metadata"]["name"], "order 42: 3 widgets")
    assert "order 42: 3 widgets" in log, log


def _crash_manifests() -> str:
    docs: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {"name": "crash", "labels": {"kustody.io/unwrap": "true"}},
        },
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "RotationPolicy",
            "metadata": {"name": "crash"},
            "spec": {"rotationPeriod": "2160h", "retireAfter": "0s", "destroyAfter": "24h"},
        },
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": "crash"},
            "spec": {
                "algorithm": "AES256GCM",
                "rotationPolicyRef": {"name": "crash"},
                "allowedNamespaces": {"names": ["crash"]},
            },
        },
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "checker", "namespace": "crash"},
        },
    ]
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i:03d}", "namespace": "crash"},
            "spec": {
                "keyRingRef": {"name": "crash"},
                "secretName": f"dk-{i:03d}",
                "consumers": ["checker"],
            },
        }
        for i in range(N)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def _sample_deks(kind: Kind, names: list[str], tag: str) -> dict[str, str]:
    """DEKs of ``names``, unwrapped by a consumer pod through the unwrap service (the path a
    workload takes: nothing here reads a key any other way)."""
    script = "; ".join(
        f"printf '{n} '; kustody unwrap --secret-dir=/dk/{n} --stdout --encoding=hex; echo"
        for n in names
    )
    sources = [
        {"secret": {"name": n, "items": [
            {"key": "wrapped-key", "path": f"{n}/wrapped-key"},
            {"key": "encryption-context", "path": f"{n}/encryption-context"}]}}
        for n in names
    ]  # fmt: skip
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"check-{tag}", "namespace": "crash"},
        "spec": {
            "serviceAccountName": "checker",
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [
                {
                    "name": "check",
                    "image": IMAGE,
                    "command": ["sh", "-ec", script],
                    "env": [
                        {
                            "name": "KUSTODY_UNWRAP_ENDPOINT",
                            "value": f"kustody-unwrap.{NS}.svc:8443",
                        },
                        {"name": "KUSTODY_UNWRAP_CA_FILE", "value": "/ca/ca.crt"},
                        {"name": "KUSTODY_UNWRAP_TOKEN_FILE", "value": "/token/token"},
                    ],
                    "volumeMounts": [
                        {"name": "dk", "mountPath": "/dk"},
                        {"name": "ca", "mountPath": "/ca"},
                        {"name": "token", "mountPath": "/token"},
                    ],
                }
            ],
            "volumes": [
                {"name": "dk", "projected": {"sources": sources}},
                {"name": "ca", "configMap": {"name": "kustody-unwrap-ca"}},
                {
                    "name": "token",
                    "projected": {
                        "sources": [
                            {
                                "serviceAccountToken": {
                                    "audience": "kustody",
                                    "expirationSeconds": 3600,
                                    "path": "token",
                                }
                            }
                        ]
                    },
                },
            ],
        },
    }
    kind.kubectl("apply", "-f", "-", input=json.dumps(pod))
    eventually(
        lambda: (
            kind.json("-n", "crash", "pod", f"check-{tag}")["status"]["phase"]
            in ("Succeeded", "Failed")
        ),
        300,
        f"the checker pod {tag}",
    )
    log = kind.kubectl("-n", "crash", "logs", f"check-{tag}")
    phase = kind.json("-n", "crash", "pod", f"check-{tag}")["status"]["phase"]
    assert phase == "Succeeded", log
    deks = dict(line.split() for line in log.splitlines() if line.strip())
    assert set(deks) == set(names), log
    return deks


def test_kustody_pod_deleted_during_a_rotation_of_200_datakeys(kind: Kind) -> None:
    kind.kubectl("apply", "--server-side", "-f", "-", input=_crash_manifests())
    ca = kind.state.joinpath("unwrap-ca.crt").read_text()
    kind.kubectl(
        "-n", "crash", "create", "configmap", "kustody-unwrap-ca", f"--from-literal=ca.crt={ca}"
    )

    def datakeys() -> list[dict[str, Any]]:
        return list(kind.json("-n", "crash", "datakeys")["items"])

    eventually(
        lambda: sum(_ready(d) for d in datakeys()) == N, 600, f"all {N} DataKeys Ready", every=5
    )
    sample = sorted(random.Random(20261202).sample([f"dk-{i:03d}" for i in range(N)], 12))
    before = _sample_deks(kind, sample, "before")
    secrets_before = {
        s["metadata"]["name"]: s["data"]["wrapped-key"]
        for s in kind.json("-n", "crash", "secrets")["items"]
        if s["metadata"]["name"].startswith("dk-")
    }
    assert len(secrets_before) == N
    pod = kind.kustody_pod()
    claim = kind.json("-n", NS, "pvc", "kustody-token")["spec"]["volumeName"]

    result = kind.kustody("rotate", "crash")
    assert result.returncode == 0, result.stderr

    def moved() -> int:
        return sum((d.get("status") or {}).get("keyRingVersion") == 2 for d in datakeys())

    # Delete the pod as soon as the re-wrap has begun (or the KeyRing has a version 2).
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = kind.json("keyring", "crash").get("status") or {}
        if status.get("primaryVersion") == 2 or moved() > 0:
            break
        time.sleep(0.2)
    at_delete = moved()
    kind.kubectl("-n", NS, "delete", "pod", pod["metadata"]["name"], "--wait=false")
    kind.show(
        f"kustody rotate crash; kubectl -n {NS} delete pod {pod['metadata']['name']}",
        f"(deleted with {at_delete} of {N} DataKeys re-wrapped)",
    )
    new = eventually(
        lambda: (name := kind.kustody_pod_ready()) and name != pod["metadata"]["name"] and name,
        300,
        "a new Kustody pod Ready",
    )
    new_pod = kind.json("-n", NS, "pod", new)
    assert kind.json("-n", NS, "pvc", "kustody-token")["spec"]["volumeName"] == claim
    token_claim = next(
        v["persistentVolumeClaim"]["claimName"]
        for v in new_pod["spec"]["volumes"]
        if v["name"] == "token"
    )
    assert token_claim == "kustody-token"
    assert "already initialised" in kind.kubectl("-n", NS, "logs", new, "-c", "init-token")

    def settled() -> bool:
        kr = kind.json("keyring", "crash")
        dks = datakeys()
        return (
            _ready(kr)
            and kr["status"].get("primaryVersion") == 2
            and all(_ready(d) and d["status"].get("keyRingVersion") == 2 for d in dks)
            and [v["state"] for v in kr["status"]["versions"]] == ["DestroyScheduled", "Enabled"]
        )

    eventually(settled, 600, "the rotation, re-wrap and retirement to settle", every=5)
    secrets = [
        s for s in kind.json("-n", "crash", "secrets")["items"]
        if s["metadata"]["name"].startswith("dk-")
    ]  # fmt: skip
    assert len(secrets) == N
    for s in secrets:
        assert s["metadata"]["labels"]["kustody.io/keyring-version"] == "2"
        assert s["data"]["wrapped-key"] != secrets_before[s["metadata"]["name"]]
    for d in datakeys():
        assert d["status"]["dekGeneration"] == 1
    kr = kind.json("keyring", "crash")["status"]
    assert {v["version"]: v["dataKeys"] for v in kr["versions"]} == {1: 0, 2: N}
    assert _sample_deks(kind, sample, "after") == before, "a DataKey's DEK changed or was lost"
    kind.show("kubectl get keyring crash", kind.kubectl("get", "keyring", "crash"))


def test_helm_uninstall_keeps_crds_and_token_volume(kind: Kind) -> None:
    fingerprints = _fingerprints(kind, "payments")
    pins = kind.json("-n", NS, "secret", "kustody-pin")["data"]
    volume = kind.json("-n", NS, "pvc", "kustody-token")["spec"]["volumeName"]
    out = kind.helm("uninstall", "kustody", "--namespace", NS, "--wait")
    kind.show(f"helm uninstall kustody -n {NS} --wait", out)
    eventually(lambda: not kind.json("-n", NS, "pods")["items"], 180, "the Kustody pod gone")
    crds = kind.kubectl("get", "crd", "-o", "name")
    for crd in ("keyrings", "datakeys", "rotationpolicies"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.kustody.io" in crds
    assert kind.json("keyring", "payments")["metadata"]["name"] == "payments"
    assert kind.json("-n", NS, "pvc", "kustody-token")["spec"]["volumeName"] == volume
    assert kind.json("-n", NS, "secret", "kustody-pin")["data"] == pins
    # A new install finds the same token: the same KEKs, the examples Ready again.
    _install(kind)
    new = eventually(kind.kustody_pod_ready, 180, "the reinstalled Kustody pod Ready")
    assert "already initialised" in kind.kubectl("-n", NS, "logs", new, "-c", "init-token")
    eventually(lambda: kind.ready("keyring", "payments"), 180, "payments Ready after reinstall")
    assert _fingerprints(kind, "payments") == fingerprints


def _etcd_value(kind: Kind, key: str) -> bytes:
    """Read a key straight from etcd inside the node (etcd's JSON gateway, etcd's own
    client certificate from kubeadm)."""
    body = json.dumps({"key": base64.b64encode(key.encode()).decode()})
    out = kind.node(
        "curl", "-sS", "--cacert", "/etc/kubernetes/pki/etcd/ca.crt",
        "--cert", "/etc/kubernetes/pki/apiserver-etcd-client.crt",
        "--key", "/etc/kubernetes/pki/apiserver-etcd-client.key",
        "-X", "POST", "-d", body, "https://127.0.0.1:2379/v3/kv/range",
    )  # fmt: skip
    kvs = json.loads(out).get("kvs") or []
    assert len(kvs) == 1, out
    return base64.b64decode(kvs[0]["value"])


def test_kind_config_encrypts_secrets_at_rest_through_kustody_kms(kind: Kind) -> None:
    kms_sock = kind.state / "host" / "kms" / "kms.sock"
    eventually(kms_sock.exists, 120, "the KMS plugin's socket on the host")
    plain = _etcd_value(kind, "/registry/secrets/payments/ledger-dek")
    assert not plain.startswith(b"k8s:enc:"), "encryption is not on yet"
    # Phase 2 of docs/kind.md: switch kube-apiserver's encryption on.
    manifest = "/etc/kubernetes/manifests/kube-apiserver.yaml"
    kind.node(
        "sed", "-i",
        "s|- kube-apiserver$|- kube-apiserver\\n    - --encryption-provider-config="
        "/etc/kubernetes/kustody/encryption-config.yaml|",
        manifest,
    )  # fmt: skip
    assert "--encryption-provider-config" in kind.node("cat", manifest)

    def kms_ready() -> bool:
        out = kind.kubectl("get", "--raw", "/readyz/kms-providers", check=False)
        args = kind.kubectl(
            "-n", "kube-system", "get", "pods", "-l", "component=kube-apiserver",
            "-o", "jsonpath={.items[0].spec.containers[0].command}", check=False,
        )  # fmt: skip
        return out.strip() == "ok" and "encryption-provider-config" in args

    eventually(kms_ready, 300, "kube-apiserver back with the KMS provider healthy", every=3)
    # Idempotent: right after its restart kube-apiserver may answer a write with a retryable
    # error after storing it, and kubectl's retry of a `create` then meets "already exists".
    hello = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "hello", "namespace": "default"},
        "stringData": {"greeting": "hi"},
    }
    eventually(
        lambda: kind.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(hello)),
        120,
        "the Secret hello written",
    )
    stored = _etcd_value(kind, "/registry/secrets/default/hello")
    kind.show(
        "kubectl create secret generic hello --from-literal=greeting=hi; "
        "(etcd in the node) get /registry/secrets/default/hello",
        f"{stored[:40]!r}...",
    )
    assert stored.startswith(b"k8s:enc:kms:v2:kustody:")
    assert b"greeting" not in stored
    back = kind.json("secret", "hello")["data"]["greeting"]
    assert base64.b64decode(back) == b"hi"
    # Rewriting re-encrypts a Secret written before encryption was on.
    kind.kubectl("-n", "payments", "annotate", "secret", "ledger-dek", "kustody.test/rewrite=1")
    assert _etcd_value(kind, "/registry/secrets/payments/ledger-dek").startswith(
        b"k8s:enc:kms:v2:kustody:"
    )
