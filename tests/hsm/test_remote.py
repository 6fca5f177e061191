"""Remote mode (``--listen`` + mTLS) against the real `kustody hsm` process: every call is
authorised by the client certificate's identity, plaintext never leaves over TCP, destruction
keeps its waiting period in the token, and every key-management outcome is audited.

The attacker here holds *some* client certificate that chains to the sidecar's client CA.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kustody.api.client import HsmClient
from kustody.api.errors import HsmError, Reason
from kustody.dev.pki import ControlPlanePKI, create_pki
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from kustody.domain.keyversion import VersionState
from kustody.sidecar.audit import AUDIT_LOGGER

from .conftest import SidecarProcess, run, start_process

BINDING = Binding("shop", "db-key", {"app": "db"})
OPERATOR = "spiffe://corp.example/kustody/operator"
KMS = "spiffe://corp.example/kustody/kms"
MONITOR = "monitor.corp.example"  # a DNS identity
STRANGER = "spiffe://corp.example/someone-else"  # chains to the CA, not in the allow-list


@pytest.fixture
def own_token(tmp_path: Path) -> DevToken:
    return create_token(tmp_path / "token", "remote-test")


class Pki:
    """The dev CA (kustody.dev.pki) plus client certificates with chosen SANs."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.pki: ControlPlanePKI = create_pki(directory / "pki")
        self.ca_pem = self.pki.ca_cert.read_bytes()
        ca_key = serialization.load_pem_private_key(self.pki.ca_key.read_bytes(), None)
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        self._ca_key = ca_key
        self._ca = x509.load_pem_x509_certificate(self.ca_pem)

    def client(self, *, uri: str | None = None, dns: str | None = None) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a client certificate signed by the CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if uri:
            names.append(x509.UniformResourceIdentifier(uri))
        if dns:
            names.append(x509.DNSName(dns))
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")]))
            .issuer_name(self._ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .sign(self._ca_key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem

    def roles_file(self) -> Path:
        path = self.dir / "client-roles.yaml"
        path.write_text(
            f'"URI:{OPERATOR}": operator\n"URI:{KMS}": kms\n"DNS:{MONITOR}": read-only\n'
        )
        return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _remote(directory: Path, token: DevToken, pki: Pki, *args: str) -> tuple[SidecarProcess, str]:
    port = _free_port()
    proc = start_process(
        directory,
        token,
        "--listen", f"127.0.0.1:{port}",
        "--tls-cert", str(pki.pki.serving_cert),
        "--tls-key", str(pki.pki.serving_key),
        "--tls-client-ca", str(pki.pki.ca_cert),
        "--client-roles", str(pki.roles_file()),
        *args,
    )  # fmt: skip
    # start_process waits for the unix socket; the TCP listener may come a moment later.
    deadline = time.monotonic() + 20
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.process.poll() is not None:
                break  # the test's own assertions say what went wrong
            time.sleep(0.05)
    return proc, f"127.0.0.1:{port}"


def _client(pki: Pki, target: str, cert: tuple[bytes, bytes]) -> HsmClient:
    return HsmClient.tcp(
        target, ca=pki.ca_pem, cert=cert[0], key=cert[1], server_name="localhost", timeout=10
    )


async def _reason(call: Awaitable[Any]) -> Reason:
    with pytest.raises(HsmError) as info:
        await call
    return info.value.reason


def _audit(log: str) -> list[dict[str, Any]]:
    marker = f"{AUDIT_LOGGER}: "
    return [json.loads(line.split(marker, 1)[1]) for line in log.splitlines() if marker in line]


def test_listen_without_an_allow_list_refuses_to_start(tmp_path: Path, own_token: DevToken) -> None:
    pki = Pki(tmp_path)
    result = subprocess.run(
        [
            sys.executable, "-m", "kustody", "hsm", "--module", str(own_token.module),
            "--token-label", own_token.label, "--pin-file", str(own_token.pin_file),
            "--socket", str(tmp_path / "s.sock"), "--listen", f"127.0.0.1:{_free_port()}",
            "--tls-cert", str(pki.pki.serving_cert), "--tls-key", str(pki.pki.serving_key),
            "--tls-client-ca", str(pki.pki.ca_cert),
        ],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, **own_token.env},
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "--listen needs --client-roles FILE" in result.stderr
    assert "Traceback" not in result.stderr


def test_remote_callers_get_only_what_their_certificate_role_allows(
    tmp_path: Path, own_token: DevToken
) -> None:
    """A certificate that chains to the client CA is not enough: its SAN identity must be in
    the allow-list, and its role must include the RPC. Every outcome is audited."""
    pki = Pki(tmp_path)
    proc, target = _remote(tmp_path, own_token, pki)
    operator, kms = pki.client(uri=OPERATOR), pki.client(uri=KMS)
    monitor, stranger = pki.client(dns=MONITOR), pki.client(uri=STRANGER)
    wrapped: list[str] = []

    async def main() -> None:
        async with _client(pki, target, operator) as op:
            assert (await op.create_key_version("pay", 1)).state is VersionState.ENABLED
            await op.create_key_version("pay", 2)
            await op.set_version_state("pay", 1, VersionState.DISABLED)
            assert (await op.describe_key("pay")).primary_version == 2
        async with _client(pki, target, kms) as client:
            key = await client.generate_data_key("pay", BINDING)
            wrapped.append(key.wrapped)
            assert (await client.describe_key("pay")).primary_version == 2
            assert await _reason(client.create_key_version("pay", 3)) is (Reason.PERMISSION_DENIED)
            assert await _reason(client.set_version_state("pay", 2, VersionState.DISABLED)) is (
                Reason.PERMISSION_DENIED
            )
            assert await _reason(client.destroy_version("pay", 1)) is Reason.PERMISSION_DENIED
            assert await _reason(client.rewrap(key.wrapped, BINDING)) is (Reason.PERMISSION_DENIED)
        async with _client(pki, target, monitor) as client:
            assert (await client.health()).serving
            assert (await client.describe_key("pay")).primary_version == 2
            assert await _reason(client.generate_data_key("pay", BINDING)) is (
                Reason.PERMISSION_DENIED
            )
        async with _client(pki, target, stranger) as client:
            for call in (
                client.health(),
                client.describe_key("pay"),
                client.generate_data_key("pay", BINDING),
                client.set_version_state("pay", 1, VersionState.ENABLED),
                client.destroy_version("pay", 1),
            ):
                assert await _reason(call) is Reason.PERMISSION_DENIED
        # The unix socket (pod-local) stays fully trusted.
        async with HsmClient.unix(proc.socket) as local:
            await local.set_version_state("pay", 1, VersionState.ENABLED)
        # Nothing the refused callers tried changed anything.
        async with _client(pki, target, operator) as op:
            states = [v.state for v in (await op.describe_key("pay")).versions]
            assert states == [VersionState.ENABLED, VersionState.ENABLED]

    try:
        run(main())
    finally:
        log = proc.stop()
    lines = _audit(log)

    def seen(rpc: str, peer: str, outcome: str, **fields: Any) -> bool:
        return any(
            a["rpc"] == rpc
            and a["peer"] == peer
            and a["outcome"] == outcome
            and all(a[k] == v for k, v in fields.items())
            for a in lines
        )

    assert seen("CreateKeyVersion", f"URI:{OPERATOR}", "ok", key_ring="pay", version=1)
    assert seen("SetVersionState", f"URI:{OPERATOR}", "ok", key_ring="pay", version=1)
    assert seen("GenerateDataKey", f"URI:{KMS}", "ok", key_ring="pay", role="kms")
    assert seen("CreateKeyVersion", f"URI:{KMS}", "PERMISSION_DENIED", version=3)
    assert seen("DestroyVersion", f"URI:{KMS}", "PERMISSION_DENIED", key_ring="pay")
    assert seen("GenerateDataKey", f"DNS:{MONITOR}", "PERMISSION_DENIED", role="read-only")
    assert seen("Health", f"URI:{STRANGER}", "PERMISSION_DENIED", role="")
    assert seen("DestroyVersion", f"URI:{STRANGER}", "PERMISSION_DENIED", version=1)
    assert seen("SetVersionState", "unix", "ok", key_ring="pay", version=1)
    # Never an envelope (or any key material) in the audit or anywhere in the log.
    assert wrapped
    assert wrapped[0] not in log
    assert wrapped[0].removeprefix("kustody:v1:")[:24] not in log


def test_plaintext_export_is_only_available_on_the_unix_socket(
    tmp_path: Path, own_token: DevToken
) -> None:
    """Over TCP even the operator role, asserting that the KeyRing allows export, gets no
    plaintext: the flag is a caller's assertion, so it is honoured only on the pod-local
    socket."""
    pki = Pki(tmp_path)
    proc, target = _remote(tmp_path, own_token, pki)
    operator = pki.client(uri=OPERATOR)

    async def main() -> None:
        async with _client(pki, target, operator) as remote:
            await remote.create_key_version("exp", 1)
            key = await remote.generate_data_key("exp", BINDING)
            assert key.plaintext is None
            assert await _reason(
                remote.generate_data_key(
                    "exp", BINDING, return_plaintext=True, allow_plaintext_export=True
                )
            ) is (Reason.PLAINTEXT_EXPORT_FORBIDDEN)
            assert await _reason(
                remote.decrypt(key.wrapped, BINDING, allow_plaintext_export=True)
            ) is (Reason.PLAINTEXT_EXPORT_FORBIDDEN)
            # Re-wrapping (no plaintext out) still works remotely.
            assert (await remote.rewrap(key.wrapped, BINDING)).to_version == 1
        async with HsmClient.unix(proc.socket) as local:
            exported = await local.generate_data_key(
                "exp", BINDING, return_plaintext=True, allow_plaintext_export=True
            )
            assert exported.plaintext is not None
            assert len(await local.decrypt(key.wrapped, BINDING, allow_plaintext_export=True)) == 32
            got = await local.decrypt(exported.wrapped, BINDING, allow_plaintext_export=True)
            assert got == exported.plaintext

    try:
        run(main())
    finally:
        log = proc.stop()
    refusals = [a for a in _audit(log) if a["outcome"] == "PLAINTEXT_EXPORT_FORBIDDEN"]
    assert {(a["rpc"], a["peer"]) for a in refusals} == {
        ("GenerateDataKey", f"URI:{OPERATOR}"),
        ("Decrypt", f"URI:{OPERATOR}"),
    }
    assert any(
        a["rpc"] == "Decrypt" and a["peer"] == "unix" and a["outcome"] == "ok" for a in _audit(log)
    )


def test_destruction_keeps_its_waiting_period_in_the_token(
    tmp_path: Path, own_token: DevToken
) -> None:
    """An operator-role certificate cannot destroy at once: DestroyVersion needs the version
    DESTROY_SCHEDULED (recorded in the token, surviving restarts) for the minimum waiting
    period; ENABLED/DISABLED cancel it."""
    pki = Pki(tmp_path)
    operator = pki.client(uri=OPERATOR)
    proc, target = _remote(tmp_path, own_token, pki, "--min-destroy-delay", "24h")

    async def default_delay() -> None:
        async with _client(pki, target, operator) as op:
            await op.create_key_version("gone", 1)
            await op.create_key_version("gone", 2)
            assert await _reason(op.destroy_version("gone", 1)) is Reason.VERSION_NOT_DISABLED
            await op.set_version_state("gone", 1, VersionState.DISABLED)
            assert await _reason(op.destroy_version("gone", 1)) is Reason.DESTRUCTION_NOT_DUE
            info = await op.set_version_state("gone", 1, VersionState.DESTROY_SCHEDULED)
            assert info.state is VersionState.DESTROY_SCHEDULED
            with pytest.raises(HsmError) as refused:
                await op.destroy_version("gone", 1)
            assert refused.value.reason is Reason.DESTRUCTION_NOT_DUE
            assert "waiting period 24h" in refused.value.message
            # Scheduled means disabled: it seals and unseals nothing.
            assert await _reason(op.generate_data_key("gone", BINDING, version=1)) is (
                Reason.VERSION_DISABLED
            )

    try:
        run(default_delay())
    finally:
        first_log = proc.stop()

    # A restart with a short waiting period: the schedule is read back from the token.
    proc, target = _remote(tmp_path, own_token, pki, "--min-destroy-delay", "3s")

    async def short_delay() -> None:
        async with _client(pki, target, operator) as op:
            states = {v.ref.version: v.state for v in (await op.describe_key("gone")).versions}
            assert states == {1: VersionState.DESTROY_SCHEDULED, 2: VersionState.ENABLED}
            # Cancel, and schedule again: the waiting period starts over.
            cancelled = await op.set_version_state("gone", 1, VersionState.DISABLED)
            assert cancelled.state is VersionState.DISABLED
            await op.set_version_state("gone", 1, VersionState.DESTROY_SCHEDULED)
            again = await op.set_version_state("gone", 1, VersionState.DESTROY_SCHEDULED)
            assert again.state is VersionState.DESTROY_SCHEDULED  # idempotent, same time
            assert await _reason(op.destroy_version("gone", 1)) is Reason.DESTRUCTION_NOT_DUE
            await asyncio.sleep(3.5)
            destroyed = await op.destroy_version("gone", 1)
            assert destroyed.state is VersionState.DESTROYED
            states = {v.ref.version: v.state for v in (await op.describe_key("gone")).versions}
            assert states == {1: VersionState.DESTROYED, 2: VersionState.ENABLED}

    try:
        run(short_delay())
    finally:
        log = proc.stop()
    outcomes = [
        (a["rpc"], a["version"], a["outcome"])
        for a in _audit(first_log + log)
        if a["rpc"] == "DestroyVersion"
    ]
    assert outcomes == [
        ("DestroyVersion", 1, "VERSION_NOT_DISABLED"),
        ("DestroyVersion", 1, "DESTRUCTION_NOT_DUE"),
        ("DestroyVersion", 1, "DESTRUCTION_NOT_DUE"),
        ("DestroyVersion", 1, "DESTRUCTION_NOT_DUE"),
        ("DestroyVersion", 1, "ok"),
    ]
