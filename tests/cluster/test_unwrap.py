"""Workloads unwrap their DataKeys: real kube-apiserver, real tokens (TokenRequest API), the
real sidecar process with the workload service, the real operator writing the Secrets.

The session sidecar is swapped, for this module, for one on the same token and socket that
also serves the workload service (one process owns a token), and restored afterwards.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubernetes import client as k8s
from kustody.client import UnwrapClient, UnwrapError
from kustody.client._proto import unwrap_pb2 as pb
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Sidecar
from kustody_helpers import apply, datakey, eventually, get, keyring, policy, ready, secret_data
from kustody_helpers import unwrap as operator_unwrap

pytestmark = pytest.mark.usefixtures("kustody_operator")

RATE, BURST = 20, 10
SEEN_DEKS: list[bytes] = []
SEEN_TOKENS: list[str] = []


# -- fixtures ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None, ca_key: Any
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A CA (what the workload trusts, from a ConfigMap in a cluster) and the serving cert."""
    directory = tmp_path_factory.mktemp("workload-pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("kustody-unwrap-ca", ca_key, None, ca_key)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _cert("kustody-unwrap", key, ca, ca_key)
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


@pytest.fixture(scope="module")
def workload_sidecar(
    kube: Cluster, hsm_sidecar: Sidecar, pki: dict[str, Path]
) -> Iterator[Sidecar]:
    """The session sidecar's token and socket, plus the workload service and metrics."""
    hsm_sidecar.stop()
    sidecar = dataclasses.replace(
        hsm_sidecar,
        workload_listen=f"127.0.0.1:{_free_port()}",
        workload_tls_cert=pki["cert"],
        workload_tls_key=pki["key"],
        kubeconfig=kube.kubeconfig,
        metrics_port=_free_port(),
        extra_args=("--workload-rate", str(RATE), "--workload-burst", str(BURST)),
    )
    sidecar.start()
    yield sidecar
    sidecar.stop()
    hsm_sidecar.start()


@dataclasses.dataclass
class World:
    kube: Cluster
    sidecar: Sidecar
    pki: dict[str, Path]
    ring: str
    a: str
    b: str
    workdir: Path

    def token(self, ns: str, sa: str, audience: str = "kustody") -> str:
        api = k8s.CoreV1Api(self.kube.api_client())
        spec = k8s.V1TokenRequestSpec(audiences=[audience], expiration_seconds=600)
        result = api.create_namespaced_service_account_token(
            sa, ns, k8s.AuthenticationV1TokenRequest(spec=spec)
        )
        token: str = result.status.token
        SEEN_TOKENS.append(token)
        return token

    def secret_dir(self, ns: str, name: str, **override: str) -> Path:
        """The DataKey's Secret written out as a volume mount would show it."""
        secret = eventually(lambda: get(self.kube, "secret", f"{name}-dek", ns), 60, "Secret")
        directory = self.workdir / f"{ns}-{name}-{secrets.token_hex(3)}"
        directory.mkdir()
        for key, value in {**secret_data(secret), **override}.items():
            (directory / key).write_text(value)
        return directory

    def client(self, token: str, **kwargs: Any) -> UnwrapClient:
        path = self.workdir / f"token-{secrets.token_hex(4)}"
        path.write_text(token)
        return UnwrapClient(
            self.sidecar.workload_listen,
            ca_file=self.pki["ca"],
            token_file=path,
            attempts=kwargs.pop("attempts", 1),
            **kwargs,
        )


@pytest.fixture(scope="module")
def world(
    kube: Cluster,
    workload_sidecar: Sidecar,
    pki: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    a, b = f"ua-{secrets.token_hex(3)}", f"ub-{secrets.token_hex(3)}"
    ring = f"unwrap-{secrets.token_hex(3)}"
    for ns in (a, b):
        kube.kubectl("create", "namespace", ns)
        for sa in ("app", "other"):
            kube.kubectl("create", "serviceaccount", sa, "-n", ns)
    apply(kube, keyring(ring, [a, b]))
    eventually(lambda: ready(get(kube, "keyring", ring)), 60, "the KeyRing to be Ready")
    for ns in (a, b):
        apply(kube, datakey("orders", ns, ring, consumers=["app"]))
        apply(kube, datakey("nobody", ns, ring))
    for ns in (a, b):
        for name in ("orders", "nobody"):
            eventually(
                lambda n=name, s=ns: ready(get(kube, "datakey", n, s)), 60, f"{ns}/{name} Ready"
            )
    yield World(kube, workload_sidecar, pki, ring, a, b, tmp_path_factory.mktemp("unwrap"))
    kube.kubectl("delete", "namespace", a, b, "--wait=false", check=False)
    kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)


def _refused(client: UnwrapClient, directory: Path) -> UnwrapError:
    with pytest.raises(UnwrapError) as err:
        client.unwrap(directory)
    assert not err.value.retryable
    return err.value


# -- who may unwrap ------------------------------------------------------------------------


def test_a_consumer_unwraps_its_datakey(world: World) -> None:
    directory = world.secret_dir(world.a, "orders")
    with world.client(world.token(world.a, "app")) as client:
        dek = client.unwrap(directory)
        again = client.unwrap_key(client_key(directory))
    expected = operator_unwrap(
        world.sidecar.socket, get(world.kube, "secret", "orders-dek", world.a) or {}
    )
    assert dek == expected
    assert len(dek) == 32
    assert again.plaintext == dek
    assert again.version == 1
    SEEN_DEKS.append(dek)


def client_key(directory: Path) -> Any:
    from kustody.client import read_secret_dir

    return read_secret_dir(directory)


def test_a_token_from_another_namespace_is_refused(world: World) -> None:
    with world.client(world.token(world.b, "app")) as client:
        error = _refused(client, world.secret_dir(world.a, "orders"))
    assert error.reason == "NAMESPACE_MISMATCH"


def test_a_service_account_not_in_consumers_is_refused(world: World) -> None:
    with world.client(world.token(world.a, "other")) as client:
        assert _refused(client, world.secret_dir(world.a, "orders")).reason == "NOT_A_CONSUMER"
    # No consumers at all: nobody (deny by default), not even a ServiceAccount of the namespace.
    with world.client(world.token(world.a, "app")) as client:
        assert _refused(client, world.secret_dir(world.a, "nobody")).reason == "NOT_A_CONSUMER"


def test_a_token_for_another_audience_is_refused(world: World) -> None:
    with world.client(world.token(world.a, "app", audience="not-kustody")) as client:
        error = _refused(client, world.secret_dir(world.a, "orders"))
    assert error.reason == "TOKEN_WRONG_AUDIENCE"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _sign(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    def part(s: str) -> dict[str, Any]:
        decoded: dict[str, Any] = json.loads(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)))
        return decoded

    header, claims, _ = token.split(".")
    return part(header), part(claims)


def _token_review(kube: Cluster, token: str) -> bool:
    api = k8s.AuthenticationV1Api(kube.api_client())
    spec = k8s.V1TokenReviewSpec(token=token, audiences=["kustody"])
    return bool(api.create_token_review(k8s.V1TokenReview(spec=spec)).status.authenticated)


def test_a_forged_token_is_refused(world: World) -> None:
    header, claims = _parts(world.token(world.a, "app"))
    forged = _sign(header, claims, rsa.generate_private_key(public_exponent=65537, key_size=2048))
    SEEN_TOKENS.append(forged)
    assert not _token_review(world.kube, forged)
    with world.client(forged) as client:
        assert _refused(client, world.secret_dir(world.a, "orders")).reason == "TOKEN_INVALID"


def test_an_expired_token_signed_by_the_cluster_is_refused(world: World) -> None:
    """The API minimum lifetime of a TokenRequest is 10 minutes, so this token is made with the
    local control plane's own ServiceAccount signing key: genuine except for ``exp``."""
    header, claims = _parts(world.token(world.a, "app"))
    now = int(time.time())
    claims.update(iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    key = serialization.load_pem_private_key(world.kube.pki.sa_key.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    expired = _sign(header, claims, key)
    SEEN_TOKENS.append(expired)
    claims["exp"] = now + 600  # the same token, unexpired, is accepted: only exp is wrong
    assert _token_review(world.kube, _sign(header, claims, key))
    assert not _token_review(world.kube, expired)
    with world.client(expired) as client:
        assert _refused(client, world.secret_dir(world.a, "orders")).reason == "TOKEN_EXPIRED"


def test_a_token_of_a_deleted_service_account_is_refused(world: World) -> None:
    world.kube.kubectl("create", "serviceaccount", "gone", "-n", world.a)
    token = world.token(world.a, "gone")
    world.kube.kubectl("delete", "serviceaccount", "gone", "-n", world.a)
    eventually(lambda: not _token_review(world.kube, token), 30, "the token to be rejected")
    with world.client(token) as client:
        assert _refused(client, world.secret_dir(world.a, "orders")).reason == "TOKEN_INVALID"


def test_no_token_is_refused(world: World) -> None:
    channel = grpc.secure_channel(
        world.sidecar.workload_listen or "",
        grpc.ssl_channel_credentials(world.pki["ca"].read_bytes()),
    )
    call = channel.unary_unary(
        "/kustody.workload.v1.Unwrap/Unwrap",
        request_serializer=pb.UnwrapRequest.SerializeToString,
        response_deserializer=pb.UnwrapResponse.FromString,
    )
    data = secret_data(get(world.kube, "secret", "orders-dek", world.a) or {})
    context = json.loads(data["encryption-context"])
    request = pb.UnwrapRequest(
        wrapped=data["wrapped-key"],
        key_ring=context["keyRing"],
        namespace=context["namespace"],
        data_key=context["dataKey"],
    )
    for metadata in ((), (("authorization", "Bearer "),), (("authorization", "Basic x"),)):
        with pytest.raises(grpc.RpcError) as err:
            call(request, metadata=metadata, timeout=5)
        assert err.value.code() is grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
        trailing = dict(err.value.trailing_metadata())  # type: ignore[attr-defined]
        assert trailing["kustody-reason"] == "TOKEN_MISSING"
    with pytest.raises(grpc.RpcError) as err:
        call(request, metadata=(("authorization", "Bearer not-a-jwt"),), timeout=5)
    assert dict(err.value.trailing_metadata())["kustody-reason"] == "TOKEN_MALFORMED"  # type: ignore[attr-defined]
    channel.close()


# -- what may be unwrapped -----------------------------------------------------------------


def test_an_envelope_copied_into_another_namespace_does_not_decrypt(world: World) -> None:
    stolen = secret_data(get(world.kube, "secret", "orders-dek", world.a) or {})["wrapped-key"]
    # B's own Secret with A's envelope in it: B's token, B's DataKey, B's binding -> AAD fails.
    copied = world.secret_dir(world.b, "orders", **{"wrapped-key": stolen})
    with world.client(world.token(world.b, "app")) as client:
        assert _refused(client, copied).reason == "AAD_MISMATCH"
        # ...and B's own key still works with the same token.
        SEEN_DEKS.append(client.unwrap(world.secret_dir(world.b, "orders")))


def test_a_deleted_datakey_is_refused(world: World) -> None:
    apply(world.kube, datakey("brief", world.a, world.ring, consumers=["app"]))
    eventually(lambda: ready(get(world.kube, "datakey", "brief", world.a)), 60, "brief Ready")
    directory = world.secret_dir(world.a, "brief")
    token = world.token(world.a, "app")
    with world.client(token, cache_ttl=0) as client:
        SEEN_DEKS.append(client.unwrap(directory))
        world.kube.kubectl("delete", "datakey", "brief", "-n", world.a)

        def refused() -> str | None:
            try:
                client.unwrap(directory)
            except UnwrapError as exc:
                return exc.reason
            return None

        assert eventually(refused, 30, "the refusal") == "DATAKEY_NOT_FOUND"


def test_a_disabled_version_is_refused_with_its_reason(world: World) -> None:
    ns, ring = world.a, f"retire-{secrets.token_hex(3)}"
    apply(world.kube, policy(f"{ring}-p", retireAfter="0s", destroyAfter="24h"))
    apply(world.kube, keyring(ring, [ns], policy=f"{ring}-p"))
    apply(world.kube, datakey("old", ns, ring, consumers=["app"]))
    eventually(lambda: ready(get(world.kube, "datakey", "old", ns)), 60, "old Ready")
    v1 = world.secret_dir(ns, "old")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    world.kube.kubectl("annotate", "keyring", ring, f"kustody.io/rotate-requested-at={stamp}")
    eventually(
        lambda: (
            (o := get(world.kube, "keyring", ring))
            and o["status"]["versions"][0]["state"] == "DestroyScheduled"
        ),
        90,
        "v1 to be retired (Disabled in the token)",
    )
    with world.client(world.token(ns, "app"), cache_ttl=0) as client:
        error = _refused(client, v1)
        assert error.reason == "VERSION_DISABLED"
        assert ring in error.message
        SEEN_DEKS.append(client.unwrap(world.secret_dir(ns, "old")))  # v2 still works
    world.kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)


def test_a_caller_over_its_rate_is_refused_and_the_client_backs_off(world: World) -> None:
    directory = world.secret_dir(world.b, "orders")
    token = world.token(world.b, "app")
    outcomes: list[str] = []
    with world.client(token, cache_ttl=0) as client:
        for _ in range(BURST * 3):
            try:
                client.unwrap(directory)
                outcomes.append("ok")
            except UnwrapError as exc:
                outcomes.append(exc.reason if exc.retryable else f"final:{exc.reason}")
    assert "RATE_LIMITED" in outcomes
    assert outcomes.count("ok") >= BURST
    time.sleep(BURST / RATE)
    with world.client(token, cache_ttl=0, attempts=8, backoff=0.2) as client:
        for _ in range(BURST * 2):
            client.unwrap(directory)  # retries with backoff instead of failing


# -- the init container --------------------------------------------------------------------


def _run_unwrap(world: World, token: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    token_file = world.workdir / f"token-{secrets.token_hex(4)}"
    token_file.write_text(token)
    env = {
        **os.environ,
        "KUSTODY_UNWRAP_ENDPOINT": world.sidecar.workload_listen or "",
        "KUSTODY_UNWRAP_CA_FILE": str(world.pki["ca"]),
        "KUSTODY_UNWRAP_TOKEN_FILE": str(token_file),
    }
    return subprocess.run(
        [sys.executable, "-m", "kustody", "unwrap", *args],
        capture_output=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_init_container_command_writes_the_key_to_memory_only(world: World) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm is missing: no tmpfs to write to")
    directory = world.secret_dir(world.a, "orders")
    token = world.token(world.a, "app")
    out_dir = shm / f"kustody-test-{secrets.token_hex(4)}"
    out_dir.mkdir(mode=0o700)
    try:
        out = out_dir / "dek"
        result = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(out))
        assert result.returncode == 0, result.stderr
        assert result.stdout == b""
        dek = out.read_bytes()
        SEEN_DEKS.append(dek)
        assert dek == operator_unwrap(
            world.sidecar.socket, get(world.kube, "secret", "orders-dek", world.a) or {}
        )
        assert out.stat().st_mode & 0o777 == 0o400
        # No temp file left behind; the keyset beside the key (the Secret publishes one).
        assert sorted(p.name for p in out_dir.iterdir()) == ["dek", "keyset.json"]
        assert (out_dir / "keyset.json").stat().st_mode & 0o777 == 0o400
        for form in (dek, dek.hex().encode(), base64.b64encode(dek)):
            assert form not in result.stderr
        assert token.encode() not in result.stderr
        again = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(out))
        assert again.returncode == 0, again.stderr  # atomic replace of a 0400 file
        printed = _run_unwrap(
            world, token, "--secret-dir", str(directory), "--stdout", "--encoding", "base64"
        )
        assert base64.b64decode(printed.stdout) == dek
    finally:
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()

    on_disk = world.workdir / "dek"  # under /tmp on disk here, not tmpfs
    refused = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(on_disk))
    assert refused.returncode == 1
    assert b"not memory-backed" in refused.stderr
    assert not on_disk.exists()
    denied = _run_unwrap(world, world.token(world.a, "other"), "--secret-dir", str(directory),
                         "--out", str(on_disk), "--allow-disk")  # fmt: skip
    assert denied.returncode == 1
    assert b"NOT_A_CONSUMER" in denied.stderr
    assert not on_disk.exists()


def test_init_container_never_writes_through_a_symlink(world: World) -> None:
    """``--out`` a symlink on disk pointing into /dev/shm: the tmpfs check used to look at
    the target's directory while the rename replaced the link on disk (the key on disk).
    Now the final component may not be a symlink, and the directory checked is the directory
    written, whichever way it is reached."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm is missing: no tmpfs to write to")
    directory = world.secret_dir(world.a, "orders")
    token = world.token(world.a, "app")
    memory = shm / f"kustody-test-{secrets.token_hex(4)}"
    memory.mkdir(mode=0o700)
    disk = world.workdir / f"disk-{secrets.token_hex(3)}"
    disk.mkdir()
    back = shm / f"kustody-test-back-{secrets.token_hex(4)}"  # in /dev/shm, pointing to disk
    back.symlink_to(disk)
    try:
        # 1. A final symlink from disk into memory: refused, nothing written anywhere.
        link = disk / "dek"
        link.symlink_to(memory / "dek")
        result = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(link))
        assert result.returncode == 1, result.stderr
        assert b"symbolic link" in result.stderr
        assert link.is_symlink()
        assert not (memory / "dek").exists()
        assert [p.name for p in disk.iterdir()] == ["dek"]
        link.unlink()
        # ...also with --allow-disk: a link is never written through or replaced.
        link.symlink_to(memory / "dek")
        forced = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(link),
                             "--allow-disk")  # fmt: skip
        assert forced.returncode == 1
        assert link.is_symlink()
        assert not (memory / "dek").exists()
        link.unlink()

        # 2. A symlinked *directory* on disk leading into memory: written in memory.
        via = disk / "keys"
        via.symlink_to(memory)
        ok = _run_unwrap(world, token, "--secret-dir", str(directory), "--out", str(via / "dek"))
        assert ok.returncode == 0, ok.stderr
        dek = (memory / "dek").read_bytes()
        SEEN_DEKS.append(dek)
        assert len(dek) == 32
        assert (memory / "dek").stat().st_mode & 0o777 == 0o400
        assert sorted(p.name for p in disk.iterdir()) == ["keys"]  # nothing on disk

        # 3. A path under /dev/shm whose directory is a link to disk: refused as disk.
        refused = _run_unwrap(world, token, "--secret-dir", str(directory), "--out",
                              str(back / "dek"))  # fmt: skip
        assert refused.returncode == 1
        assert b"not memory-backed" in refused.stderr
        assert sorted(p.name for p in disk.iterdir()) == ["keys"]
    finally:
        back.unlink()
        for p in memory.iterdir():
            p.unlink()
        memory.rmdir()


# -- revocation reaches what was already issued ------------------------------------------------


def _reason_now(client: UnwrapClient, directory: Path) -> str:
    try:
        SEEN_DEKS.append(client.unwrap(directory))
    except UnwrapError as exc:
        return exc.reason
    return "ok"


def test_a_namespace_removed_from_the_keyring_can_no_longer_unwrap(world: World) -> None:
    ns, ring = f"uc-{secrets.token_hex(3)}", f"revoke-{secrets.token_hex(3)}"
    world.kube.kubectl("create", "namespace", ns)
    world.kube.kubectl("create", "serviceaccount", "app", "-n", ns)
    try:
        apply(world.kube, keyring(ring, [ns, world.a]))
        apply(world.kube, datakey("orders", ns, ring, consumers=["app"]))
        eventually(lambda: ready(get(world.kube, "datakey", "orders", ns)), 60, "orders Ready")
        directory = world.secret_dir(ns, "orders")
        with world.client(world.token(ns, "app"), cache_ttl=0) as client:
            assert _reason_now(client, directory) == "ok"
            world.kube.kubectl(
                "patch", "keyring", ring, "--type", "merge",
                "-p", json.dumps({"spec": {"allowedNamespaces": {"names": [world.a]}}}),
            )  # fmt: skip
            # The Secret (wrapped key) is still there; the unwrap is what is refused now,
            # within the KeyRing cache time (--workload-datakey-ttl, 5 s).
            started = time.monotonic()
            reason = eventually(
                lambda: (r := _reason_now(client, directory)) != "ok" and r, 30, "the refusal"
            )
            assert reason == "NAMESPACE_NOT_ALLOWED"
            assert time.monotonic() - started < 15
            error = _refused(client, directory)
            assert error.reason == "NAMESPACE_NOT_ALLOWED"
            assert ring in error.message
    finally:
        world.kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)
        world.kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_a_namespace_relabelled_out_of_the_keyring_selector_can_no_longer_unwrap(
    world: World,
) -> None:
    ns, ring = f"ud-{secrets.token_hex(3)}", f"select-{secrets.token_hex(3)}"
    label = f"kustody-test/{ring}"
    world.kube.kubectl("create", "namespace", ns)
    world.kube.kubectl("label", "namespace", ns, f"{label}=yes")
    world.kube.kubectl("create", "serviceaccount", "app", "-n", ns)
    try:
        body = json.loads(keyring(ring, []))
        body["spec"]["allowedNamespaces"] = {"selector": {"matchLabels": {label: "yes"}}}
        apply(world.kube, json.dumps(body))
        apply(world.kube, datakey("orders", ns, ring, consumers=["app"]))
        eventually(lambda: ready(get(world.kube, "datakey", "orders", ns)), 60, "orders Ready")
        directory = world.secret_dir(ns, "orders")
        with world.client(world.token(ns, "app"), cache_ttl=0) as client:
            assert _reason_now(client, directory) == "ok"
            world.kube.kubectl("label", "namespace", ns, f"{label}-")
            reason = eventually(
                lambda: (r := _reason_now(client, directory)) != "ok" and r, 30, "the refusal"
            )
            assert reason == "NAMESPACE_NOT_ALLOWED"
    finally:
        world.kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)
        world.kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


# -- the audit does not lie --------------------------------------------------------------------


def _audit(world: World) -> list[dict[str, Any]]:
    log = world.sidecar.proc.logfile.read_text(errors="replace")
    return [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]


def _metric(world: World, name: str, labels: str) -> float:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{world.sidecar.metrics_port}/metrics", timeout=5
    ) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _hsm_worker(world: World) -> int:
    """The sidecar's PKCS#11 worker process (the front end's child)."""
    front = world.sidecar.proc.pid()
    assert front is not None
    children = Path(f"/proc/{front}/task/{front}/children").read_text().split()
    workers = [
        int(pid)
        for pid in children
        if b"kustody.pkcs11.worker" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]
    assert len(workers) == 1, children
    return workers[0]


def test_a_cancelled_or_timed_out_unwrap_is_never_audited_as_ok(world: World) -> None:
    """The HSM worker is paused (SIGSTOP) so the call is inside the decrypt, authenticated and
    authorised, when its caller gives up: once by deadline, once by cancelling. Neither may be
    recorded as a success, in the audit line or the metrics."""
    name = f"cancel-{secrets.token_hex(3)}"
    apply(world.kube, datakey(name, world.a, world.ring, consumers=["app"]))
    eventually(lambda: ready(get(world.kube, "datakey", name, world.a)), 60, f"{name} Ready")
    key = client_key(world.secret_dir(world.a, name))
    ok_label = f'namespace="{world.a}",outcome="ok"'
    with world.client(world.token(world.a, "app"), cache_ttl=0) as client:
        SEEN_DEKS.append(client.unwrap_key(key).plaintext)  # token, DataKey, KeyRing cached
        ok_before = _metric(world, "kustody_unwrap_requests_total", ok_label)
        worker = _hsm_worker(world)
        os.kill(worker, signal.SIGSTOP)
        try:
            timed_out = world.client(world.token(world.a, "app"), cache_ttl=0, timeout=1.0)
            with timed_out, pytest.raises(UnwrapError) as err:
                # (a second token: this call's review is fresh, the decrypt is where it waits)
                timed_out.unwrap_key(key)
            assert err.value.reason == "UNREACHABLE"  # DEADLINE_EXCEEDED, client side
            channel = grpc.secure_channel(
                world.sidecar.workload_listen or "",
                grpc.ssl_channel_credentials(world.pki["ca"].read_bytes()),
            )
            call = channel.unary_unary(
                "/kustody.workload.v1.Unwrap/Unwrap",
                request_serializer=pb.UnwrapRequest.SerializeToString,
                response_deserializer=pb.UnwrapResponse.FromString,
            )
            request = pb.UnwrapRequest(
                wrapped=key.wrapped, key_ring=key.key_ring, namespace=key.namespace,
                data_key=key.data_key, encryption_context=dict(key.encryption_context),
            )  # fmt: skip
            token = world.token(world.a, "app")
            future = call.future(request, metadata=(("authorization", f"Bearer {token}"),),
                                 timeout=30)  # fmt: skip
            time.sleep(1.0)
            assert future.cancel()
            channel.close()
            time.sleep(0.5)
        finally:
            os.kill(worker, signal.SIGCONT)
        # The HSM path is healthy again: the next call succeeds, and is the only new "ok".
        SEEN_DEKS.append(client.unwrap_key(key).plaintext)

    def records() -> list[dict[str, Any]] | None:
        mine = [r for r in _audit(world) if r["data_key"] == name]
        return mine if len(mine) >= 4 else None

    mine = eventually(records, 10, "four audit records")
    assert [r["outcome"] for r in mine] == ["ok", "cancelled", "cancelled", "ok"], mine
    assert {r["reason"] for r in mine[1:3]} == {"DEADLINE_EXCEEDED", "CANCELLED"}
    assert all(r["service_account"] == "app" and r["version"] == 1 for r in mine)
    assert _metric(world, "kustody_unwrap_requests_total", ok_label) == ok_before + 1
    cancelled = sum(
        _metric(world, "kustody_unwrap_requests_total", f'namespace="{world.a}",outcome="{r}"')
        for r in ("CANCELLED", "DEADLINE_EXCEEDED")
    )
    assert cancelled >= 2


# -- the front door under abuse ----------------------------------------------------------------


def _forged_tokens(world: World, count: int) -> list[str]:
    """Distinct JWTs that pass every unverified check (audience kustody, not expired, a real
    ServiceAccount's claims) but carry a signature the API server cannot verify."""
    header, claims = _parts(world.token(world.a, "app"))
    out = []
    for _ in range(count):
        claims["jti"] = secrets.token_hex(8)
        head = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
        out.append(f"{head}.{_b64(secrets.token_bytes(256))}")
    SEEN_TOKENS.extend(out[:5])
    return out


def _api_token_reviews(world: World) -> float:
    """TokenReviews the real kube-apiserver has served (its own apiserver_request_total)."""
    text = world.kube.kubectl("get", "--raw", "/metrics").stdout
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("apiserver_request_total{") and 'resource="tokenreviews"' in line
    )


def _flood(world: World, tokens: list[str]) -> dict[str, int]:
    """Send one unwrap per token, all at once; count the reasons."""
    key = client_key(world.secret_dir(world.a, "orders"))
    request = pb.UnwrapRequest(
        wrapped=key.wrapped, key_ring=key.key_ring, namespace=key.namespace,
        data_key=key.data_key, encryption_context=dict(key.encryption_context),
    )  # fmt: skip
    channel = grpc.secure_channel(
        world.sidecar.workload_listen or "",
        grpc.ssl_channel_credentials(world.pki["ca"].read_bytes()),
    )
    call = channel.unary_unary(
        "/kustody.workload.v1.Unwrap/Unwrap",
        request_serializer=pb.UnwrapRequest.SerializeToString,
        response_deserializer=pb.UnwrapResponse.FromString,
    )
    futures = [
        call.future(request, metadata=(("authorization", f"Bearer {t}"),), timeout=60)
        for t in tokens
    ]
    reasons: dict[str, int] = {}
    for future in futures:
        try:
            future.result()
            reason = "ok"
        except grpc.RpcError as exc:
            reason = dict(exc.trailing_metadata() or ()).get("kustody-reason", "?")  # type: ignore[attr-defined]
        reasons[reason] = reasons.get(reason, 0) + 1
    channel.close()
    return reasons


def test_a_flood_of_forged_tokens_is_limited_before_any_token_review(world: World) -> None:
    """Default limits (10 new tokens/s per address, burst 20): 300 distinct forged tokens
    from one address cost the API server about 20 TokenReviews, not 300; the rest are refused
    at once as PEER_RATE_LIMITED. A good caller whose token is cached is not held up."""
    good = world.client(world.token(world.a, "app"), cache_ttl=0)
    directory = world.secret_dir(world.a, "orders")
    with good:
        SEEN_DEKS.append(good.unwrap(directory))  # its review is cached
        time.sleep(3)  # the address's bucket is full again (earlier tests made tokens)
        tokens = _forged_tokens(world, 300)
        before = _api_token_reviews(world)
        started = time.monotonic()
        reasons = _flood(world, tokens)
        elapsed = time.monotonic() - started
        reviewed = _api_token_reviews(world) - before
        assert sum(reasons.values()) == 300
        assert reviewed <= 20 + 10 * elapsed + 1, (reviewed, reasons)
        assert reasons.get("TOKEN_INVALID", 0) == reviewed
        # Everything else was refused at the door, at once: mostly by the per-address limit
        # (some may meet the in-flight bound first).
        at_the_door = reasons.get("PEER_RATE_LIMITED", 0) + reasons.get("AUTH_BUSY", 0)
        assert at_the_door == 300 - reviewed, reasons
        assert reasons.get("PEER_RATE_LIMITED", 0) > 200, reasons
        SEEN_DEKS.append(good.unwrap(directory))  # cached: no review, no limit
    time.sleep(3)  # refill, for the tests that follow (their tokens come from this address)


@pytest.fixture
def open_front_door(world: World) -> Iterator[World]:
    """The workload sidecar restarted with the per-address and global review limits lifted
    (as for a flood from many addresses) and small caches, then restored."""
    world.sidecar.stop()
    original = world.sidecar
    open_door = dataclasses.replace(
        original,
        extra_args=(
            *original.extra_args,
            "--workload-peer-review-rate", "100000", "--workload-peer-review-burst", "100000",
            "--workload-review-rate", "100000", "--workload-review-burst", "100000",
            "--workload-reviews-in-flight", "1000",
            "--workload-review-cache-size", "4", "--workload-refusal-cache-size", "16",
        ),
    )  # fmt: skip
    open_door.start()
    try:
        yield dataclasses.replace(world, sidecar=open_door)
    finally:
        open_door.stop()
        original.start()


def test_a_flood_of_forged_tokens_does_not_evict_a_good_callers_cache_entry(
    open_front_door: World,
) -> None:
    world = open_front_door
    directory = world.secret_dir(world.a, "orders")
    ok = 'result="ok"'
    with world.client(world.token(world.a, "app"), cache_ttl=0) as good:
        SEEN_DEKS.append(good.unwrap(directory))
        assert _metric(world, "kustody_unwrap_token_reviews_total", ok) == 1
        reasons = _flood(world, _forged_tokens(world, 200))
        # Every forged token reached a review (the limits are lifted): the refusal cache
        # (16) overflowed many times over; the success cache (4) was never touched.
        assert reasons == {"TOKEN_INVALID": 200}, reasons
        assert _metric(world, "kustody_unwrap_token_reviews_total", 'result="refused"') == 200
        for _ in range(5):
            SEEN_DEKS.append(good.unwrap(directory))
        assert _metric(world, "kustody_unwrap_token_reviews_total", ok) == 1  # still cached


def test_token_reviews_in_flight_are_bounded(world: World) -> None:
    """At most --workload-reviews-in-flight TokenReviews at once; the excess is refused at once
    with AUTH_BUSY (retryable), not queued."""
    world.sidecar.stop()
    original = world.sidecar
    bounded = dataclasses.replace(
        original,
        extra_args=(
            *original.extra_args,
            "--workload-peer-review-rate", "100000", "--workload-peer-review-burst", "100000",
            "--workload-review-rate", "100000", "--workload-review-burst", "100000",
            "--workload-reviews-in-flight", "2",
        ),
    )  # fmt: skip
    bounded.start()
    try:
        view = dataclasses.replace(world, sidecar=bounded)
        before = _api_token_reviews(view)
        reasons = _flood(view, _forged_tokens(view, 200))
        reviewed = _api_token_reviews(view) - before
        assert reasons.get("AUTH_BUSY", 0) > 0, reasons
        assert reasons.get("TOKEN_INVALID", 0) == reviewed
        assert reasons.get("AUTH_BUSY", 0) + reviewed == 200
        # A good caller still gets in (retrying on AUTH_BUSY like any backoff reason).
        with view.client(view.token(view.a, "app"), cache_ttl=0, attempts=8) as good:
            SEEN_DEKS.append(good.unwrap(view.secret_dir(view.a, "orders")))
    finally:
        bounded.stop()
        original.start()


# -- audit, metrics, no leaks ----------------------------------------------------------------


def test_audit_lines_and_metrics_record_every_unwrap_without_secrets(world: World) -> None:
    directory = world.secret_dir(world.a, "orders")
    with world.client(world.token(world.a, "app")) as client:
        SEEN_DEKS.append(client.unwrap(directory))
    with world.client(world.token(world.a, "other")) as client:
        _refused(client, directory)
    log = world.sidecar.proc.logfile.read_text(errors="replace")
    records = [json.loads(line) for line in log.splitlines() if line.startswith('{"ts"')]
    mine = [r for r in records if r["request_namespace"] == world.a and r["data_key"] == "orders"]
    ok = [r for r in mine if r["outcome"] == "ok"]
    assert ok
    assert ok[-1]["namespace"] == world.a
    assert ok[-1]["service_account"] == "app"
    assert ok[-1]["key_ring"] == world.ring
    assert ok[-1]["version"] == 1
    assert ok[-1]["latency_ms"] >= 0
    refused = [r for r in mine if r["reason"] == "NOT_A_CONSUMER"]
    assert refused
    assert refused[-1]["service_account"] == "other"

    with urllib.request.urlopen(
        f"http://127.0.0.1:{world.sidecar.metrics_port}/metrics", timeout=5
    ) as response:
        metrics = response.read().decode()
    assert f'kustody_unwrap_requests_total{{namespace="{world.a}",outcome="ok"}}' in metrics
    assert f'namespace="{world.a}",outcome="NOT_A_CONSUMER"' in metrics
    assert "kustody_unwrap_duration_seconds_bucket" in metrics

    raw = log.encode()
    assert SEEN_DEKS
    assert SEEN_TOKENS
    for dek in SEEN_DEKS:
        for form in (dek, dek.hex().encode(), base64.b64encode(dek)):
            assert form not in raw
    for token in SEEN_TOKENS:
        assert token.encode() not in raw
        assert token.split(".")[2].encode() not in raw  # not even the signature


def test_the_example_workload_passes_server_side_dry_run(
    kube: Cluster, kube_namespace: str, kustody_crds: Path, repo: Path
) -> None:
    example = repo / "examples" / "workload" / "workload.yaml"
    result = kube.kubectl(
        "apply", "--dry-run=server", "-n", kube_namespace, "-f", str(example), check=False
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "deployment.apps/orders-api created (server dry run)" in result.stdout


def test_the_init_container_writes_the_whole_keyset_and_old_data_still_decrypts(
    world: World,
) -> None:
    """Issue 11: after a regeneration the workload gets every generation in one unwrap call,
    so data encrypted under the earlier generation stays readable."""
    from kustody.client.keyset import Keyset

    kube, ns = world.kube, world.a
    apply(kube, datakey("gens", ns, world.ring, consumers=["app"]))
    eventually(lambda: ready(get(kube, "datakey", "gens", ns)), 60, "gens Ready")
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("/dev/shm is missing: no tmpfs to write to")
    out_dir = shm / f"kustody-test-{secrets.token_hex(4)}"
    out_dir.mkdir(mode=0o700)
    token = world.token(ns, "app")
    try:
        args = ("--secret-dir", str(world.secret_dir(ns, "gens")), "--out", str(out_dir / "dek"))
        assert _run_unwrap(world, token, *args).returncode == 0
        first = Keyset.load(out_dir / "keyset.json")
        old = first.encrypt(b"before the regeneration", b"ad")

        kube.kubectl(
            "-n", ns, "annotate", "datakey", "gens",
            "kustody.io/regenerate-requested-at=2026-12-02T00:00:00Z",
        )  # fmt: skip
        eventually(
            lambda: len(json.loads(secret_data(get(kube, "secret", "gens-dek", ns) or {})
                                   .get("keyset", "{}") or "{}").get("keys", [])) == 2,
            60,
            "two generations in the Secret",
        )  # fmt: skip
        args = ("--secret-dir", str(world.secret_dir(ns, "gens")), "--out", str(out_dir / "dek"))
        result = _run_unwrap(world, token, *args)
        assert result.returncode == 0, result.stderr
        second = Keyset.load(out_dir / "keyset.json")
        assert len(second.key_ids) == 2
        assert second.primary_key_id != first.primary_key_id
        assert second.decrypt(old, b"ad") == b"before the regeneration"
        assert (out_dir / "dek").read_bytes() == operator_unwrap(
            world.sidecar.socket, get(kube, "secret", "gens-dek", ns) or {}
        )
        keyset_bytes = (out_dir / "keyset.json").read_bytes()
        assert keyset_bytes not in result.stderr
        assert token.encode() not in result.stderr
        # A pod of another namespace gets nothing, keyset or not.
        denied = _run_unwrap(world, world.token(world.b, "app"), *args)
        assert denied.returncode == 1
        assert b"NAMESPACE_MISMATCH" in denied.stderr
    finally:
        for p in out_dir.iterdir():
            p.unlink()
        out_dir.rmdir()
