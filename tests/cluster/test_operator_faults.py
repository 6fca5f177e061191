"""Faults around the operator, each on a control plane of its own: the HSM sidecar going
away and coming back, two operator replicas, and what the metrics say meanwhile."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from kustody.dev.controlplane import Cluster
from kustody.dev.pki import create_pki, issue_client_certificate
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody_helpers import (
    apply,
    condition,
    datakey,
    eventually,
    get,
    isolated_plane,
    keyring,
    ready,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def plane(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    for cluster in isolated_plane(kube, tmp_path_factory.mktemp("faults")):
        cluster.kubectl("create", "namespace", "apps")
        yield cluster


@pytest.fixture
def token(make_softhsm_token: Callable[[str], SoftHSMToken]) -> SoftHSMToken:
    return make_softhsm_token("faults")


@pytest.fixture
def sidecar(token: SoftHSMToken, tmp_path: Path) -> Iterator[Sidecar]:
    sc = Sidecar(tmp_path / "stack", token).start()
    yield sc
    sc.stop()


def _operator(plane: Cluster, sidecar: Sidecar, name: str, **kw: object) -> Operator:
    return Operator(sidecar.state_dir, plane, sidecar.socket, name=name, identity=name, **kw)  # type: ignore[arg-type]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def _metric(text: str, prefix: str) -> float:
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line starts with {prefix!r}")


def test_hsm_outage_is_visible_harmless_and_recovers(plane: Cluster, sidecar: Sidecar) -> None:
    port = _free_port()
    op = _operator(plane, sidecar, "op-outage", metrics_port=port).start()
    try:
        op.wait_active()
        apply(plane, keyring("outage", ["apps"]))
        apply(plane, datakey("before", "apps", "outage"))
        eventually(lambda: ready(get(plane, "datakey", "before", "apps")), 60, "before Ready")
        secret_rv = (get(plane, "secret", "before-dek", "apps") or {})["metadata"][
            "resourceVersion"
        ]

        metrics = _scrape(port)
        assert _metric(metrics, 'kustody_keyring_versions{keyring="outage",state="Enabled"}') == 1
        assert _metric(metrics, 'kustody_keyring_ready{keyring="outage"}') == 1
        assert _metric(metrics, 'kustody_datakeys{ready="true",reason="KeyAvailable"}') >= 1
        assert (
            _metric(metrics, 'kustody_hsm_requests_total{op="BatchGenerateDataKey",outcome="ok"}')
            >= 1
        )
        assert "kustody_reconcile_duration_seconds_bucket" in metrics
        assert "kustody_kube_requests_total" in metrics

        sidecar.stop()
        kr = eventually(
            lambda: (
                (o := get(plane, "keyring", "outage"))
                and condition(o, "HSMReachable").get("status") == "False"
                and o
            ),
            60,
            "HSMReachable=False",
        )
        assert condition(kr, "Ready")["reason"] == "HSMUnavailable"
        apply(plane, datakey("during", "apps", "outage"))
        during = eventually(
            lambda: (
                (o := get(plane, "datakey", "during", "apps"))
                and condition(o, "Ready").get("reason") == "HSMUnavailable"
                and o
            ),
            60,
            "a new DataKey to wait for the HSM",
        )
        assert "TOKEN_UNAVAILABLE" in condition(during, "Ready")["message"]
        assert _metric(_scrape(port), 'kustody_keyring_ready{keyring="outage"}') == 0
        # Existing Secrets are left exactly as they were.
        still = get(plane, "secret", "before-dek", "apps") or {}
        assert still["metadata"]["resourceVersion"] == secret_rv

        sidecar.start()
        eventually(
            lambda: (
                condition(get(plane, "keyring", "outage"), "HSMReachable").get("status") == "True"
            ),
            60,
            "HSMReachable=True again",
        )
        eventually(lambda: ready(get(plane, "datakey", "during", "apps")), 60, "during Ready")
        assert ready(get(plane, "keyring", "outage"))
        after = get(plane, "secret", "before-dek", "apps") or {}
        assert after["metadata"]["resourceVersion"] == secret_rv
    finally:
        op.stop()
        plane.kubectl("delete", "datakey", "--all", "-n", "apps", "--wait=false")


def test_two_replicas_only_the_lease_holder_acts(plane: Cluster, sidecar: Sidecar) -> None:
    first = _operator(plane, sidecar, "replica-a").start()
    first.wait_active()
    second = _operator(plane, sidecar, "replica-b").start()
    try:
        eventually(lambda: "waiting for lease" in second.log(), 30, "replica-b to stand by")
        holder = plane.kubectl(
            "-n", "kustody-system", "get", "lease", "kustody-operator",
            "-o", "jsonpath={.spec.holderIdentity}",
        ).stdout  # fmt: skip
        assert holder == "replica-a"
        apply(plane, keyring("replicas", ["apps"]))
        apply(plane, datakey("one", "apps", "replicas"))
        eventually(lambda: ready(get(plane, "datakey", "one", "apps")), 60, "one Ready")
        assert "synced" not in second.log()  # the standby never started reconciling

        first.kill()  # SIGKILL: no chance to release the Lease
        killed_at = time.monotonic()
        second.wait_active(timeout=60)
        failover = time.monotonic() - killed_at
        assert failover < 45, f"failover took {failover:.0f}s"
        apply(plane, datakey("two", "apps", "replicas"))
        eventually(lambda: ready(get(plane, "datakey", "two", "apps")), 60, "two Ready")
        holder = plane.kubectl(
            "-n", "kustody-system", "get", "lease", "kustody-operator",
            "-o", "jsonpath={.spec.holderIdentity}",
        ).stdout  # fmt: skip
        assert holder == "replica-b"
    finally:
        first.stop()
        second.stop()


def test_operator_uses_a_remote_sidecar_over_mtls(
    plane: Cluster, token: SoftHSMToken, tmp_path: Path
) -> None:
    """The on-premises mode: the sidecar next to the HSM, the operator reaching it by mTLS."""
    pki = create_pki(tmp_path / "pki")  # a CA and a 127.0.0.1 serving cert
    identity = "spiffe://kustody.test/operator"
    cert, key = issue_client_certificate(pki, tmp_path / "clients", "operator", uri=identity)
    roles = tmp_path / "roles.yaml"
    roles.write_text(f'"URI:{identity}": operator\n')
    port = _free_port()
    remote = Sidecar(
        tmp_path / "remote",
        token,
        extra_args=(
            "--listen", f"127.0.0.1:{port}",
            "--tls-cert", str(pki.serving_cert),
            "--tls-key", str(pki.serving_key),
            "--tls-client-ca", str(pki.ca_cert),
            "--client-roles", str(roles),
        ),
    ).start()  # fmt: skip
    op = Operator(
        tmp_path / "op",
        plane,
        tmp_path / "no-such.sock",  # must not be used in remote mode
        name="op-remote",
        identity="op-remote",
        extra_args=(
            "--hsm-endpoint", f"127.0.0.1:{port}",
            "--hsm-tls-cert", str(cert),
            "--hsm-tls-key", str(key),
            "--hsm-tls-ca", str(pki.ca_cert),
            "--hsm-server-name", "localhost",
        ),
    ).start()  # fmt: skip
    try:
        op.wait_active()
        apply(plane, keyring("remote", ["apps"]))
        apply(plane, datakey("far", "apps", "remote"))
        eventually(lambda: ready(get(plane, "datakey", "far", "apps")), 60, "far Ready")
        kr = get(plane, "keyring", "remote") or {}
        assert condition(kr, "HSMReachable")["status"] == "True"
    finally:
        op.stop()
        remote.stop()
        plane.kubectl("delete", "datakey", "far", "-n", "apps", "--wait=false")


def test_remote_mode_without_client_certificate_is_a_clear_error(plane: Cluster) -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "kustody", "operator", "--kubeconfig", str(plane.kubeconfig),
         "--hsm-endpoint", "127.0.0.1:1"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert "needs mutual TLS" in result.stderr
    assert "--hsm-tls-cert" in result.stderr
    assert "Traceback" not in result.stderr


def test_sigterm_stops_cleanly_and_releases_the_lease(plane: Cluster, sidecar: Sidecar) -> None:
    """A pod termination: exit 0, the Lease given up so a standby takes over at once."""
    op = _operator(plane, sidecar, "op-term").start()
    op.wait_active()
    assert op.proc.popen is not None
    op.proc.popen.terminate()
    assert op.proc.popen.wait(timeout=30) == 0
    holder = plane.kubectl(
        "-n", "kustody-system", "get", "lease", "kustody-operator",
        "-o", "jsonpath={.spec.holderIdentity}",
    ).stdout  # fmt: skip
    assert holder == ""
    # Kustody itself reports no error; Kopf 1.45 may log retries of its discovery requests
    # after closing its own connection during shutdown (upstream noise, not ours).
    assert " ERROR kustody" not in op.log()
    assert "stopping: " not in op.log()  # what run() logs when it stops for a bad reason
