"""The image (``make image``, built with podman from a Debian base made here) runs: its CLI,
the HSM sidecar on a fresh SoftHSM2 token initialised as uid 10001 by the chart's own
init-token program, and the operator in a container against a real local control plane.

Network: the sidecar containers have no network at all (``--network none``; the key service
is a unix socket in a bind-mounted directory). The operator container shares the host's
network namespace only to reach the test's own kube-apiserver on 127.0.0.1, the one address
it is given.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from kind_helpers import ROOT, eventually, run
from kustody.dev.controlplane import Cluster, ControlPlane

pytestmark = [pytest.mark.kind, pytest.mark.timeout(1800)]

UID = 10001
MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SOFTHSM_CONF = """\
directories.tokendir = /var/lib/kustody/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
"""


class TokenDirs:
    """Host directories mounted as the chart mounts its volumes, owned by uid 10001."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf, self.tokens, self.pin, self.run = (
            root / "softhsm", root / "tokens", root / "pin", root / "run",
        )  # fmt: skip
        for d in (self.conf, self.tokens, self.pin, self.run):
            d.mkdir(parents=True)
        (self.conf / "softhsm2.conf").write_text(SOFTHSM_CONF)
        (self.conf / "init-token.py").write_text(
            (ROOT / "charts" / "kustody" / "files" / "init-token.py").read_text()
        )
        (self.pin / "user-pin").write_text(secrets.token_hex(8) + "\n")
        (self.pin / "so-pin").write_text(secrets.token_hex(8) + "\n")
        root.chmod(0o755)
        for path in [root, *root.rglob("*")]:
            os.chown(path, UID, UID)
        for f in self.pin.iterdir():
            f.chmod(0o400)

    def mounts(self, *, so_pin: bool = False) -> list[str]:
        args = [
            "-v", f"{self.conf}:/etc/softhsm:ro",
            "-v", f"{self.tokens}:/var/lib/kustody/tokens",
            "-v", f"{self.run}:/run/kustody",
            "-e", "SOFTHSM2_CONF=/etc/softhsm/softhsm2.conf",
        ]  # fmt: skip
        if so_pin:
            return [*args, "-v", f"{self.pin}:/etc/kustody/pin:ro"]
        # The sidecar sees the user PIN only, as in the chart.
        return [*args, "-v", f"{self.pin / 'user-pin'}:/etc/kustody/pin/user-pin:ro"]


def _init_token(image: str, dirs: TokenDirs) -> str:
    return run(
        [
            "podman",
            "run",
            "--rm",
            "--network",
            "none",
            "--user",
            f"{UID}:{UID}",
            "--read-only",
            "--tmpfs",
            "/tmp",
            *dirs.mounts(so_pin=True),
            "-e",
            "TOKEN_LABEL=kustody",
            "-e",
            f"PKCS11_MODULE={MODULE}",
            "-e",
            "PIN_DIR=/etc/kustody/pin",
            "--entrypoint",
            "python",
            image,
            "/etc/softhsm/init-token.py",
        ]
    )


@pytest.fixture
def container_names() -> Iterator[list[str]]:
    """Names of containers a test starts; removed afterwards whatever happened."""
    names: list[str] = []
    yield names
    for name in names:
        subprocess.run(["podman", "rm", "-f", "-t", "5", name], capture_output=True, check=False)


def _start_sidecar(image: str, dirs: TokenDirs, names: list[str]) -> str:
    name = f"kustody-image-test-hsm-{secrets.token_hex(3)}"
    names.append(name)
    run(
        [
            "podman",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "--user",
            f"{UID}:{UID}",
            "--read-only",
            "--tmpfs",
            "/tmp",
            *dirs.mounts(),
            image,
            "hsm",
            f"--module={MODULE}",
            "--token-label=kustody",
            "--pin-file=/etc/kustody/pin/user-pin",
            "--socket=/run/kustody/hsm.sock",
            "--metrics-port=8081",
            "--metrics-address=127.0.0.1",
        ]
    )
    eventually(
        lambda: (dirs.run / "hsm.sock").exists(),
        60,
        f"the sidecar's socket (log: {run(['podman', 'logs', name], check=False)[-2000:]})",
        every=0.5,
    )
    return name


def test_help(kustody_image: str) -> None:
    out = run(["podman", "run", "--rm", "--network", "none", kustody_image, "--help"])
    for command in ("operator", "hsm", "unwrap"):
        assert command in out
    user = run(
        ["podman", "image", "inspect", "--format", "{{.Config.User}}", kustody_image]
    ).strip()
    assert user == f"{UID}:{UID}"


def test_sidecar_on_a_fresh_token_as_uid_10001(
    kustody_image: str, tmp_path: Path, container_names: list[str]
) -> None:
    dirs = TokenDirs(tmp_path / "hsm")
    out = _init_token(kustody_image, dirs)
    assert "SoftHSM2 token kustody initialised" in out
    token_files = [p for p in dirs.tokens.rglob("*") if p.is_file()]
    assert token_files, "init-token wrote no token files"
    assert {p.stat().st_uid for p in token_files} == {UID}
    # A second run finds the token and leaves it (the init container on every pod start).
    assert "already initialised" in _init_token(kustody_image, dirs)

    name = _start_sidecar(kustody_image, dirs, container_names)
    metrics = eventually(
        lambda: run(
            [
                "podman",
                "exec",
                name,
                "python",
                "-c",
                "import urllib.request as u;"
                "print(u.urlopen('http://127.0.0.1:8081/metrics', timeout=2).read().decode())",
            ],
            check=False,
        ),
        60,
        "the sidecar's metrics",
    )
    assert "kustody_hsm_token_up 1.0" in metrics
    assert (dirs.run / "hsm.sock").stat().st_uid == UID
    who = run(["podman", "exec", name, "id", "-u"]).strip()
    assert who == str(UID)


@pytest.fixture(scope="module")
def image_test_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A control plane of this module's own: the session's (``kube``) may have an operator
    of its own reconciling every KeyRing, which must not meet this one."""
    from kustody.dev import binaries

    plane = ControlPlane(
        tmp_path_factory.mktemp("image-plane"), binaries=binaries.build(), log=lambda _: None
    )
    cluster = plane.start()
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(ROOT / "crds"))
        cluster.kubectl(
            "wait", "--for=condition=Established", "--timeout=60s",
            "crd/keyrings.kustody.io", "crd/datakeys.kustody.io",
            "crd/rotationpolicies.kustody.io",
        )  # fmt: skip
        yield cluster
    finally:
        plane.stop()


def test_operator_in_a_container_against_the_local_control_plane(
    kustody_image: str,
    image_test_plane: Cluster,
    tmp_path: Path,
    container_names: list[str],
) -> None:
    kube = image_test_plane
    dirs = TokenDirs(tmp_path / "hsm")
    _init_token(kustody_image, dirs)
    _start_sidecar(kustody_image, dirs, container_names)
    # The operator's kubeconfig with the credentials inline, readable by uid 10001 only.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(kube.kubectl("config", "view", "--raw", "--flatten").stdout)
    os.chown(kubeconfig, UID, UID)
    kubeconfig.chmod(0o400)
    kube.kubectl("create", "namespace", "kustody-system")
    name = f"kustody-image-test-operator-{secrets.token_hex(3)}"
    container_names.append(name)
    run(
        [
            "podman",
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "host",
            "--user",
            f"{UID}:{UID}",
            "--read-only",
            "--tmpfs",
            "/tmp",
            "-v",
            f"{kubeconfig}:/etc/kustody/kubeconfig:ro",
            "-v",
            f"{dirs.run}:/run/kustody",
            kustody_image,
            "operator",
            "--kubeconfig=/etc/kustody/kubeconfig",
            "--hsm-socket=/run/kustody/hsm.sock",
            "--namespace=kustody-system",
            "--identity=image-test",
            "--metrics-port=0",
        ]
    )
    for example in ("rotationpolicy.yaml", "keyring.yaml", "datakeys.yaml"):
        kube.kubectl("apply", "--server-side", "-f", str(ROOT / "examples" / example))

    def ready(*args: str) -> bool:
        out = kube.kubectl(
            "get", *args, "-o", "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
            check=False,
        )  # fmt: skip
        return out.stdout.strip() == "True"

    def logs() -> str:
        return run(["podman", "logs", name], check=False)[-3000:]

    eventually(lambda: ready("keyring", "payments"), 120, f"KeyRing payments Ready ({logs()})")
    eventually(
        lambda: ready("-n", "payments", "datakey", "ledger"), 120, f"DataKey Ready ({logs()})"
    )
    secret = kube.kubectl(
        "-n", "payments", "get", "secret", "ledger-dek", "-o", "jsonpath={.data}"
    ).stdout
    assert "wrapped-key" in secret
    running = run(["podman", "inspect", "--format", "{{.State.Running}}", name]).strip()
    assert running == "true", logs()
