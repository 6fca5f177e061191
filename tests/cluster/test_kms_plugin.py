"""The sidecar as the KMS v2 plugin of a real kube-apiserver (encryption of Secrets at rest).

Design:

* A fresh SoftHSM2 token and a ``kustody hsm`` subprocess serving KMS v2 on a unix socket for
  KeyRing ``cluster-secrets`` (``--kms-create-if-missing`` creates version 1).
* A second control plane (not the session ``kube``) started with an EncryptionConfiguration
  that puts the plugin first and ``identity`` second for Secrets.
* Rotation: ``CreateKeyVersion(cluster-secrets, 2)`` makes v2 the primary version, so the
  plugin's key_id changes at once. kube-apiserver notices a key_id change only through its
  Status poll (about once a minute while healthy) and it caches the DEK seed, so instead of
  waiting up to a minute the test restarts the control plane on the same state directory: etcd
  keeps its data directory, the new kube-apiserver asks Status at start-up, sees the v2 key_id
  and seals a new seed under v2. This is deterministic and takes seconds, and it also shows
  that the old Secrets decrypt through the plugin after a restart (the cached seed is gone, so
  kube-apiserver must call Decrypt with the v1 key_id).
* The raw etcd value is ``k8s:enc:kms:v2:kustody:`` + an EncryptedObject protobuf that holds
  the key_id (``cluster-secrets:v<N>:<fingerprint>``) and the plugin's envelope of the seed.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import grpc.aio
import pytest
from kustody.api._proto import kms_v2_pb2 as kms
from kustody.api._proto import kms_v2_pb2_grpc as kms_grpc
from kustody.api.client import HsmClient
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.kmsplugin import KmsPlugin
from kustody.dev.softhsm import SoftHSMToken

pytestmark = pytest.mark.cluster

RING = "cluster-secrets"
PREFIX = b"k8s:enc:kms:v2:kustody:"


@dataclass
class Plugin:
    process: subprocess.Popen[bytes]
    token: SoftHSMToken
    socket: Path
    kms_socket: Path
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_plugin(directory: Path, token: SoftHSMToken, *extra: str) -> Plugin:
    directory.mkdir(parents=True, exist_ok=True)
    socket, kms_socket, log = directory / "hsm.sock", directory / "kms.sock", directory / "hsm.log"
    command = [
        sys.executable, "-m", "kustody", "hsm", "--module", str(token.module),
        "--token-label", token.label, "--pin-file", str(token.pin_file),
        "--socket", str(socket), "--kms-socket", str(kms_socket), "--kms-keyring", RING,
        "--kms-create-if-missing", "--health-interval", "0.5", *extra,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, env={**os.environ, **token.env}, stdout=out, stderr=subprocess.STDOUT
        )
    plugin = Plugin(process, token, socket, kms_socket, log)
    deadline = time.monotonic() + 30
    while not kms_socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            plugin.stop()
            raise AssertionError(f"the KMS plugin did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return plugin


def create_version(plugin: Plugin, version: int) -> None:
    """``CreateKeyVersion(RING, version)`` through the sidecar: the new primary version."""

    async def create() -> None:
        async with HsmClient.unix(plugin.socket) as client:
            await client.create_key_version(RING, version)

    asyncio.run(create())


def kms_status(kms_socket: Path) -> kms.StatusResponse:
    async def call() -> kms.StatusResponse:
        async with grpc.aio.insecure_channel(f"unix:{kms_socket}") as channel:
            stub = kms_grpc.KeyManagementServiceStub(channel)  # type: ignore[no-untyped-call]
            reply: kms.StatusResponse = await stub.Status(kms.StatusRequest(), timeout=10)
            return reply

    return asyncio.run(call())


def encryption_config(path: Path, kms_socket: Path) -> Path:
    path.write_text(
        f"""apiVersion: apiserver.config.k8s.io/v1
kind: EncryptionConfiguration
resources:
  - resources: [secrets]
    providers:
      - kms:
          apiVersion: v2
          name: kustody
          endpoint: unix://{kms_socket}
          timeout: 3s
      - identity: {{}}
"""
    )
    return path


@pytest.fixture
def plugin(tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]) -> Iterator[Plugin]:
    plugin = start_plugin(tmp_path / "hsm", make_softhsm_token("kms"))
    try:
        yield plugin
    finally:
        plugin.stop()


@pytest.fixture
def planes() -> Iterator[list[ControlPlane]]:
    """Control planes started by a test; all are stopped afterwards."""
    started: list[ControlPlane] = []
    yield started
    for plane in started:
        plane.stop()


def start_plane(
    planes: list[ControlPlane], state_dir: Path, kube: Cluster, config: Path
) -> Cluster:
    plane = ControlPlane(
        state_dir, binaries=kube.binaries, encryption_config=config, log=lambda _: None
    )
    planes.append(plane)
    return plane.start()


def secret_key(namespace: str, name: str) -> str:
    return f"/registry/secrets/{namespace}/{name}"


def create_secret(cluster: Cluster, namespace: str, name: str, value: str) -> None:
    cluster.kubectl(
        "create", "secret", "generic", name, "-n", namespace, f"--from-literal=token={value}"
    )


def read_secret(cluster: Cluster, namespace: str, name: str) -> str:
    out = cluster.kubectl(
        "get", "secret", name, "-n", namespace, "-o", "go-template={{.data.token | base64decode}}"
    )
    return out.stdout


def test_secrets_are_encrypted_by_the_plugin_and_survive_rotation(
    tmp_path: Path, kube: Cluster, plugin: Plugin, planes: list[ControlPlane]
) -> None:
    status = kms_status(plugin.kms_socket)
    assert status.healthz == "ok", status.healthz
    assert status.key_id.startswith(f"{RING}:v1:")
    config = encryption_config(tmp_path / "encryption.yaml", plugin.kms_socket)
    state_dir = tmp_path / "plane"
    cluster = start_plane(planes, state_dir, kube, config)

    cluster.kubectl("create", "namespace", "kms")
    old = {f"old-{i}": f"plaintext-before-rotation-{i}-{os.urandom(6).hex()}" for i in range(3)}
    for name, value in old.items():
        create_secret(cluster, "kms", name, value)
    for name, value in old.items():
        raw = cluster.etcd_get(secret_key("kms", name))
        assert raw is not None
        assert raw.startswith(PREFIX), raw[:40]
        assert value.encode() not in raw
        assert f"{RING}:v1:".encode() in raw
        assert read_secret(cluster, "kms", name) == value

    # Rotate: v2 becomes the primary version, so the plugin's key_id changes at once.
    create_version(plugin, 2)
    status = kms_status(plugin.kms_socket)
    assert status.healthz == "ok", status.healthz
    assert status.key_id.startswith(f"{RING}:v2:")

    # Restart kube-apiserver (with etcd) on the same data instead of waiting for its Status
    # poll; see the module docstring.
    planes.pop().stop()
    cluster = start_plane(planes, state_dir, kube, config)

    for name, value in old.items():
        assert read_secret(cluster, "kms", name) == value
        raw = cluster.etcd_get(secret_key("kms", name))
        assert raw is not None
        assert f"{RING}:v1:".encode() in raw

    fresh = f"plaintext-after-rotation-{os.urandom(6).hex()}"
    create_secret(cluster, "kms", "new", fresh)
    raw = cluster.etcd_get(secret_key("kms", "new"))
    assert raw is not None
    assert raw.startswith(PREFIX)
    assert fresh.encode() not in raw
    assert f"{RING}:v2:".encode() in raw
    assert f"{RING}:v1:".encode() not in raw
    assert read_secret(cluster, "kms", "new") == fresh

    # Rewriting an old Secret (what `kubectl get secrets -A -o json | kubectl replace -f -`
    # does after a rotation) re-encrypts it under the new key_id.
    cluster.kubectl("annotate", "secret", "old-0", "-n", "kms", "kustody.io/rewritten=yes")
    raw = cluster.etcd_get(secret_key("kms", "old-0"))
    assert raw is not None
    assert f"{RING}:v2:".encode() in raw
    assert read_secret(cluster, "kms", "old-0") == old["old-0"]

    log = plugin.log.read_text()
    for value in [*old.values(), fresh]:
        assert value not in log


def wait_for_healthz(kms_socket: Path, healthy: bool, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    while True:
        healthz = kms_status(kms_socket).healthz
        if (healthz == "ok") == healthy or time.monotonic() > deadline:
            return healthz
        time.sleep(0.2)


def test_status_reports_an_unusable_token(tmp_path: Path, plugin: Plugin) -> None:
    """With the token gone from the module, Status says why instead of ``ok``; then recovers."""
    assert kms_status(plugin.kms_socket).healthz == "ok"
    token_dir = next((plugin.token.directory / "tokens").iterdir())
    parked = tmp_path / "parked-token"
    shutil.move(token_dir, parked)
    try:
        healthz = wait_for_healthz(plugin.kms_socket, healthy=False)
        assert healthz != "ok"
        assert healthz.split(":", 1)[0] in {"TOKEN_LOST", "TOKEN_NOT_FOUND"}, healthz
        assert plugin.process.poll() is None  # still serving
    finally:
        shutil.move(parked, token_dir)
    assert wait_for_healthz(plugin.kms_socket, healthy=True) == "ok"


def test_the_go_plugin_takes_over_and_reads_what_the_sidecar_sealed(
    tmp_path: Path,
    kube: Cluster,
    plugin: Plugin,
    planes: list[ControlPlane],
    kms_plugin_binary: Path,
) -> None:
    """``kustody-kms`` (kms/) replaces the sidecar's KMS socket under the same provider name:
    kube-apiserver reads the Secrets the sidecar sealed through it, seals new ones, and follows
    a rotation the sidecar makes."""
    state_dir = tmp_path / "plane"
    cluster = start_plane(
        planes, state_dir, kube, encryption_config(tmp_path / "py.yaml", plugin.kms_socket)
    )
    cluster.kubectl("create", "namespace", "kms")
    before = {f"py-{i}": f"sealed-by-the-sidecar-{i}-{os.urandom(6).hex()}" for i in range(3)}
    for name, value in before.items():
        create_secret(cluster, "kms", name, value)
    planes.pop().stop()

    go = KmsPlugin(
        kms_plugin_binary,
        plugin.token,
        RING,
        tmp_path / "go" / "kms.sock",
        tmp_path / "go.log",
        ("--health-interval", "1s"),
    ).start()
    try:
        assert wait_for_healthz(go.socket, healthy=True) == "ok"
        assert kms_status(go.socket).key_id == kms_status(plugin.kms_socket).key_id
        config = encryption_config(tmp_path / "go.yaml", go.socket)
        cluster = start_plane(planes, state_dir, kube, config)
        for name, value in before.items():
            assert read_secret(cluster, "kms", name) == value
        fresh = f"sealed-by-go-{os.urandom(6).hex()}"
        create_secret(cluster, "kms", "go-1", fresh)
        raw = cluster.etcd_get(secret_key("kms", "go-1"))
        assert raw is not None
        assert raw.startswith(PREFIX)
        assert fresh.encode() not in raw
        assert f"{RING}:v1:".encode() in raw
        assert read_secret(cluster, "kms", "go-1") == fresh

        # The sidecar rotates; the Go plugin's key_id follows within a health pass.
        create_version(plugin, 2)
        deadline = time.monotonic() + 20
        while f"{RING}:v2:" not in kms_status(go.socket).key_id:
            assert time.monotonic() < deadline, kms_status(go.socket)
            time.sleep(0.2)
        planes.pop().stop()
        cluster = start_plane(planes, state_dir, kube, config)
        rotated = f"sealed-by-go-after-rotation-{os.urandom(6).hex()}"
        create_secret(cluster, "kms", "go-2", rotated)
        raw = cluster.etcd_get(secret_key("kms", "go-2"))
        assert raw is not None
        assert f"{RING}:v2:".encode() in raw
        for name, value in {**before, "go-1": fresh, "go-2": rotated}.items():
            assert read_secret(cluster, "kms", name) == value
    finally:
        log = go.stop()
    for value in [*before.values(), fresh]:
        assert value not in log
