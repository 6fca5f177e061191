"""End to end on kind: build and load the image, helm install, apply the examples, and a
workload unwraps its DEK. Runs where Docker and kind exist (.github/workflows/kind.yaml);
skipped with the reason printed (pytest -ra) everywhere else.

    pytest -m kind tests/kind --keep-cluster   # keep the cluster for a look afterwards
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "ghcr.io/kustody/kustody:kind-e2e"


def _missing() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not on PATH"
    info = subprocess.run(["docker", "info"], capture_output=True, text=True, check=False)
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
        return f"no Docker engine ({last})"
    if shutil.which("kind") is None:
        return "kind is not on PATH (https://kind.sigs.k8s.io/docs/user/quick-start/)"
    if shutil.which("helm") is None:
        return "helm is not on PATH"
    return None


_REASON = _missing()
pytestmark = [
    pytest.mark.kind,
    pytest.mark.skipif(
        _REASON is not None, reason=f"kind end-to-end tests need Docker and kind: {_REASON}"
    ),
]


def _eventually(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    from pytest_kind import KindCluster  # imported here: collection must work without Docker

    kms_dir = Path("/tmp/kustody-kind/kms")
    kms_dir.mkdir(parents=True, exist_ok=True)
    kms_dir.chmod(0o777)
    shutil.copy(
        ROOT / "docs" / "kind" / "encryption-config.yaml", kms_dir.parent / "encryption-config.yaml"
    )
    subprocess.run(["docker", "build", "-t", IMAGE, str(ROOT)], check=True)
    kind = KindCluster(request.config.getoption("cluster_name"))
    kind.create(config_file=ROOT / "kind-config.yaml")
    kind.load_docker_image(IMAGE)
    try:
        yield kind
    finally:
        if not request.config.getoption("keep_cluster"):
            kind.delete()


def _helm(cluster: Any, *args: str) -> str:
    env = {"KUBECONFIG": str(cluster.kubeconfig_path), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    return subprocess.run(
        ["helm", *args], env=env, capture_output=True, text=True, check=True
    ).stdout


def _ready(cluster: Any, *args: str) -> bool:
    try:
        obj = json.loads(cluster.kubectl("get", *args, "-o", "json"))
    except subprocess.CalledProcessError:
        return False
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in (obj.get("status") or {}).get("conditions") or ()
    )


def _unwrap_tls(directory: Path) -> dict[str, Path]:
    """A CA and a serving certificate for kustody-unwrap.kustody-system.svc."""
    import datetime as dt

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
    names = ["kustody-unwrap", "kustody-unwrap.kustody-system", "kustody-unwrap.kustody-system.svc"]
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


def test_install_apply_examples_and_unwrap(cluster: Any) -> None:
    repo, tag = IMAGE.rsplit(":", 1)
    cluster.kubectl("create", "namespace", "kustody-system")
    cluster.kubectl(
        "label", "namespace", "kustody-system", "pod-security.kubernetes.io/enforce=restricted"
    )
    # The unwrap service's TLS: a CA and a certificate for its Service name; the CA is
    # published where examples/workload/workload.yaml expects it (in a real cluster
    # cert-manager and trust-manager would do this).
    tls = _unwrap_tls(Path(tempfile.mkdtemp()))
    cluster.kubectl(
        "-n", "kustody-system", "create", "secret", "tls", "kustody-unwrap-tls",
        f"--cert={tls['cert']}", f"--key={tls['key']}",
    )  # fmt: skip
    _helm(
        cluster, "install", "kustody", str(ROOT / "charts" / "kustody"),
        "--namespace", "kustody-system",
        "--set", f"image.repository={repo}", "--set", f"image.tag={tag}",
        "--set", "image.pullPolicy=Never",
        "--set", "unwrap.enabled=true", "--set", "unwrap.tlsSecret=kustody-unwrap-tls",
        "--wait", "--timeout", "5m",
    )  # fmt: skip
    cluster.kubectl("-n", "kustody-system", "rollout", "status", "deploy/kustody", "--timeout=300s")
    for name in ("rotationpolicy.yaml", "keyring.yaml", "datakeys.yaml"):
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "examples" / name))
    _eventually(lambda: _ready(cluster, "keyring", "payments"), 180, "KeyRing payments Ready")
    _eventually(
        lambda: _ready(cluster, "-n", "payments", "datakey", "ledger"), 180, "DataKey Ready"
    )
    secret = json.loads(
        cluster.kubectl("-n", "payments", "get", "secret", "ledger-dek", "-o", "json")
    )
    assert "wrapped-key" in secret["data"]

    workload = ROOT / "examples" / "workload" / "workload.yaml"
    if not workload.exists():
        pytest.skip(
            "examples/workload/workload.yaml (workload unwrap, docs/unwrap.md) is not there yet"
        )
    cluster.kubectl(
        "-n", "payments", "create", "configmap", "kustody-unwrap-ca",
        f"--from-file=ca.crt={tls['ca']}",
    )  # fmt: skip
    manifest = workload.read_text().replace("ghcr.io/kustody/kustody:0.1.0", IMAGE)
    applied = Path(tempfile.mkdtemp()) / "workload.yaml"
    applied.write_text(manifest)
    cluster.kubectl("apply", "--server-side", "-n", "payments", "-f", str(applied))
    _eventually(
        lambda: (
            "1"
            in cluster.kubectl(
                "-n",
                "payments",
                "get",
                "deploy",
                "orders-api",
                "-o",
                "jsonpath={.status.readyReplicas}",
            )
        ),
        300,
        "the workload to unwrap its DEK in its init container and become ready",
    )
