"""The KeyService over gRPC on a unix socket: the client's view, reasons, metrics, mTLS."""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import urllib.request
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kustody.api._proto import keyservice_pb2 as pb
from kustody.api._proto import keyservice_pb2_grpc as pb_grpc
from kustody.api.client import GenerateItem, HsmClient
from kustody.api.errors import HsmError, Reason
from kustody.api.token import TokenConfig
from kustody.domain.aad import Binding
from kustody.domain.keyversion import VersionState
from kustody.sidecar.access import ClientRoles, Role
from kustody.sidecar.audit import AUDIT_LOGGER
from kustody.sidecar.keyservice import CHUNK_ITEMS
from kustody.sidecar.server import TlsConfig

from .conftest import run, running_sidecar

BINDING = Binding("shop", "db-key", {"app": "db"})


async def _reason(coro: object) -> Reason:
    with pytest.raises(HsmError) as info:
        await coro  # type: ignore[misc]
    return info.value.reason


def test_operator_flow_over_the_socket(
    tmp_path: Path, token_config: TokenConfig, ring: str
) -> None:
    async def main() -> None:
        async with (
            running_sidecar(tmp_path, token_config) as sidecar,
            HsmClient.unix(sidecar.config.socket or "") as hsm,
        ):
            assert (await hsm.health()).serving
            v1 = await hsm.create_key_version(ring, 1)
            assert await hsm.create_key_version(ring, 1) == v1
            key = await hsm.generate_data_key(ring, BINDING)
            assert key.plaintext is None
            assert key.wrapped.startswith("kustody:v1:")
            assert (
                await _reason(hsm.generate_data_key(ring, BINDING, return_plaintext=True))
                is Reason.PLAINTEXT_EXPORT_FORBIDDEN
            )
            assert (
                await _reason(hsm.decrypt(key.wrapped, BINDING, allow_plaintext_export=False))
                is Reason.PLAINTEXT_EXPORT_FORBIDDEN
            )
            exported = await hsm.generate_data_key(
                ring, BINDING, return_plaintext=True, allow_plaintext_export=True
            )
            assert exported.plaintext is not None
            assert len(exported.plaintext) == 32
            got = await hsm.decrypt(exported.wrapped, BINDING, allow_plaintext_export=True)
            assert got == exported.plaintext
            other = Binding("other-ns", "db-key", {"app": "db"})
            assert (
                await _reason(hsm.decrypt(exported.wrapped, other, allow_plaintext_export=True))
                is Reason.AAD_MISMATCH
            )

            await hsm.create_key_version(ring, 2)
            moved = await hsm.rewrap(exported.wrapped, BINDING)
            assert (moved.from_version, moved.to_version) == (1, 2)
            assert moved.wrapped != exported.wrapped
            again = await hsm.decrypt(moved.wrapped, BINDING, allow_plaintext_export=True)
            assert again == exported.plaintext

            batch = await hsm.batch_generate_data_keys(
                [GenerateItem(ring, Binding("shop", f"k{i}")) for i in range(10)]
                + [GenerateItem(ring, BINDING, version=9)]
            )
            assert all(not isinstance(b, HsmError) for b in batch[:10])
            last = batch[10]
            assert isinstance(last, HsmError)
            assert last.reason is Reason.VERSION_NOT_FOUND
            rewrapped = await hsm.batch_rewrap(
                [(key.wrapped, BINDING), ("kustody:v1:!!", BINDING)], to_version=2
            )
            assert not isinstance(rewrapped[0], HsmError)
            assert rewrapped[0].to_version == 2
            assert isinstance(rewrapped[1], HsmError)
            assert rewrapped[1].reason is Reason.MALFORMED_ENVELOPE

            await hsm.set_version_state(ring, 1, VersionState.DISABLED)
            assert (
                await _reason(hsm.decrypt(exported.wrapped, BINDING, allow_plaintext_export=True))
                is Reason.VERSION_DISABLED
            )
            assert await _reason(hsm.destroy_version(ring, 2)) is Reason.VERSION_NOT_DISABLED
            assert await _reason(hsm.destroy_version(ring, 1)) is Reason.DESTRUCTION_NOT_DUE
            scheduled = await hsm.set_version_state(ring, 1, VersionState.DESTROY_SCHEDULED)
            assert scheduled.state is VersionState.DESTROY_SCHEDULED
            destroyed = await hsm.destroy_version(ring, 1)
            assert destroyed.state is VersionState.DESTROYED
            assert (
                await _reason(hsm.decrypt(exported.wrapped, BINDING, allow_plaintext_export=True))
                is Reason.VERSION_DESTROYED
            )
            description = await hsm.describe_key(ring)
            assert description.primary_version == 2
            assert [(v.ref.version, v.state) for v in description.versions] == [
                (1, VersionState.DESTROYED),
                (2, VersionState.ENABLED),
            ]

    run(main())


def test_reason_travels_in_trailing_metadata(tmp_path: Path, token_config: TokenConfig) -> None:
    async def main() -> None:
        async with (
            running_sidecar(tmp_path, token_config) as sidecar,
            grpc.aio.insecure_channel(f"unix:{sidecar.config.socket}") as channel,
        ):
            stub = pb_grpc.KeyServiceStub(channel)
            request = pb.DecryptRequest(wrapped="vault:v1:abc", allow_plaintext_export=True)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Decrypt(request)
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            metadata = dict(info.value.trailing_metadata() or ())
            assert metadata["kustody-reason"] == "MALFORMED_ENVELOPE"

    run(main())


def test_oversized_requests_are_typed(tmp_path: Path, token_config: TokenConfig, ring: str) -> None:
    async def main() -> None:
        async with (
            running_sidecar(tmp_path, token_config) as sidecar,
            HsmClient.unix(sidecar.config.socket or "") as hsm,
        ):
            await hsm.create_key_version(ring, 1)
            too_many = [GenerateItem(ring, BINDING)] * 1001
            assert await _reason(hsm.batch_generate_data_keys(too_many)) is (
                Reason.REQUEST_TOO_LARGE
            )
            async with grpc.aio.insecure_channel(f"unix:{sidecar.config.socket}") as channel:
                huge = pb.Binding(
                    namespace="shop", name="db-key", encryption_context={"k": "v" * 5000}
                )
                request = pb.GenerateDataKeyRequest(key_ring=ring, binding=huge)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await pb_grpc.KeyServiceStub(channel).GenerateDataKey(request)
                assert dict(info.value.trailing_metadata() or ())["kustody-reason"] == (
                    "INVALID_ARGUMENT"
                )
            assert await _reason(
                hsm.decrypt("kustody:v1:" + "A" * 5_000_000, BINDING, allow_plaintext_export=True)
            ) is (Reason.REQUEST_TOO_LARGE)
            assert await _reason(hsm.generate_data_key(ring, BINDING, length=100_000)) is (
                Reason.INVALID_ARGUMENT
            )
            # The sidecar keeps serving.
            assert (await hsm.generate_data_key(ring, BINDING)).version == 1

    run(main())


def test_metrics_count_operations_versions_and_token(
    tmp_path: Path, token_config: TokenConfig, ring: str
) -> None:
    async def main() -> str:
        async with (
            running_sidecar(tmp_path, token_config, metrics_port=0) as sidecar,
            HsmClient.unix(sidecar.config.socket or "") as hsm,
        ):
            await hsm.create_key_version(ring, 1)
            await hsm.create_key_version(ring, 2)
            await hsm.set_version_state(ring, 1, VersionState.DISABLED)
            key = await hsm.generate_data_key(
                ring, BINDING, return_plaintext=True, allow_plaintext_export=True
            )
            await _reason(hsm.decrypt(key.wrapped, Binding("x", "y"), allow_plaintext_export=True))
            url = f"http://127.0.0.1:{sidecar.metrics_port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())
            assert key.plaintext is not None
            assert key.plaintext.hex() not in body
            return body

    body = run(main())
    assert 'kustody_hsm_requests_total{op="GenerateDataKey",outcome="ok"} 1.0' in body
    assert 'kustody_hsm_requests_total{op="Decrypt",outcome="AAD_MISMATCH"} 1.0' in body
    assert 'kustody_hsm_request_duration_seconds_count{op="GenerateDataKey"} 1.0' in body
    assert f'kustody_hsm_key_versions{{keyring="{ring}",state="ENABLED"}} 1.0' in body
    assert f'kustody_hsm_key_versions{{keyring="{ring}",state="DISABLED"}} 1.0' in body
    assert "kustody_hsm_token_up 1.0" in body


def test_hammer_64_concurrent_clients(tmp_path: Path, token_config: TokenConfig, ring: str) -> None:
    """Many clients at once, each on its own channel: no crash, every round trip correct."""

    async def client(socket: str, n: int) -> int:
        async with HsmClient.unix(socket) as hsm:
            # Everyone races to create the same version: still exactly one KEK.
            await hsm.create_key_version(ring, 1)
            ok = 0
            for i in range(n):
                binding = Binding("ns", f"dk-{i}")
                key = await hsm.generate_data_key(
                    ring, binding, return_plaintext=True, allow_plaintext_export=True
                )
                got = await hsm.decrypt(key.wrapped, binding, allow_plaintext_export=True)
                ok += got == key.plaintext
                batch = await hsm.batch_generate_data_keys([GenerateItem(ring, binding)] * 5)
                rewrapped = await hsm.batch_rewrap(
                    [(b.wrapped, binding) for b in batch if not isinstance(b, HsmError)]
                )
                ok += sum(not isinstance(r, HsmError) for r in rewrapped) == 5
            return ok

    async def main() -> list[int]:
        async with running_sidecar(tmp_path, token_config) as sidecar:
            socket = str(sidecar.config.socket)
            results = await asyncio.gather(*(client(socket, 10) for _ in range(64)))
            description = await sidecar.service.describe_key(ring)
            assert len(description.versions) == 1
            assert (await sidecar.service.health()).serving
            return results

    assert run(main()) == [20] * 64


def _cert(
    name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey, ca: bool,
) -> x509.Certificate:  # fmt: skip
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(obj: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_tcp_requires_client_certificate(tmp_path: Path, token_config: TokenConfig) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("kustody-test-ca", ca_key, None, ca_key, ca=True)
    server_key, client_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    server = _cert("localhost", server_key, ca, ca_key, ca=False)
    client = _cert("operator", client_key, ca, ca_key, ca=False)
    for name, data in {
        "ca.pem": _pem(ca), "server.pem": _pem(server), "server.key": _pem(server_key),
    }.items():  # fmt: skip
        (tmp_path / name).write_bytes(data)
    tls = TlsConfig(tmp_path / "server.pem", tmp_path / "server.key", tmp_path / "ca.pem")

    async def main() -> None:
        roles = ClientRoles({"DNS:localhost": Role.OPERATOR})
        async with running_sidecar(
            tmp_path, token_config, listen="127.0.0.1:0", tls=tls, client_roles=roles
        ) as sidecar:
            target = f"localhost:{sidecar.tcp_port}"
            async with HsmClient.tcp(
                target, ca=_pem(ca), cert=_pem(client), key=_pem(client_key), timeout=5
            ) as hsm:
                assert (await hsm.health()).serving
            # Without a client certificate the handshake fails.
            credentials = grpc.ssl_channel_credentials(_pem(ca))
            async with grpc.aio.secure_channel(target, credentials) as channel:
                stub = pb_grpc.KeyServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stub.Health(pb.HealthRequest(), timeout=5)
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE

    run(main())


def test_batches_over_several_chunks_answer_every_item_in_order(
    tmp_path: Path, token_config: TokenConfig, ring: str
) -> None:
    """Items refused while decoding (anywhere, first and last included) and items refused by
    the worker keep their places among the good ones, across the worker chunks."""
    count = 3 * CHUNK_ITEMS + 7
    binding = pb.Binding(namespace="shop", name="db-key", encryption_context={"app": "db"})
    refused = {
        0: "INVALID_ARGUMENT",  # empty binding namespace (decoding)
        CHUNK_ITEMS - 1: "PLAINTEXT_EXPORT_FORBIDDEN",  # (decoding)
        CHUNK_ITEMS: "INVALID_ARGUMENT",  # DEK length out of range (the key service)
        2 * CHUNK_ITEMS + 1: "VERSION_NOT_FOUND",  # (the worker)
        count - 1: "INVALID_ARGUMENT",
    }

    def item(i: int) -> pb.GenerateDataKeyRequest:
        request = pb.GenerateDataKeyRequest(key_ring=ring, version=1, binding=binding)
        if i in (0, count - 1):
            request.binding.namespace = ""
        elif i == CHUNK_ITEMS - 1:
            request.return_plaintext = True
        elif i == CHUNK_ITEMS:
            request.length = 4
        elif i == 2 * CHUNK_ITEMS + 1:
            request.version = 9
        else:
            request.return_plaintext = request.allow_plaintext_export = i % 2 == 0
        return request

    async def main() -> None:
        async with (
            running_sidecar(tmp_path, token_config) as sidecar,
            HsmClient.unix(sidecar.config.socket or "") as hsm,
        ):
            await hsm.create_key_version(ring, 1)
            await hsm.create_key_version(ring, 2)
            stub = pb_grpc.KeyServiceStub(hsm._channel)  # type: ignore[no-untyped-call]
            request = pb.BatchGenerateDataKeyRequest(items=[item(i) for i in range(count)])
            reply = await stub.BatchGenerateDataKey(request)
            assert len(reply.results) == count
            good = []
            for i, result in enumerate(reply.results):
                if i in refused:
                    assert result.WhichOneof("result") == "error", i
                    assert result.error.reason == refused[i], (i, result.error)
                else:
                    assert result.WhichOneof("result") == "data_key", i
                    assert (len(result.data_key.plaintext) == 32) is (i % 2 == 0)
                    good.append(result.data_key.wrapped)

            rewraps = [pb.ReWrapRequest(wrapped=w, binding=binding, to_version=2) for w in good]
            rewraps[5].wrapped = "kustody:v1:not-base64!"
            rewraps[-1].binding.name = "other"
            rewraps.insert(CHUNK_ITEMS, pb.ReWrapRequest(wrapped=good[0], binding=binding))
            rewraps[CHUNK_ITEMS].binding.namespace = ""
            rewrapped = await stub.BatchReWrap(pb.BatchReWrapRequest(items=rewraps))
            assert len(rewrapped.results) == len(rewraps)
            expected = {
                5: "MALFORMED_ENVELOPE",
                CHUNK_ITEMS: "INVALID_ARGUMENT",
                len(rewraps) - 1: "AAD_MISMATCH",
            }
            for i, result in enumerate(rewrapped.results):
                if i in expected:
                    assert result.error.reason == expected[i], (i, result.error)
                else:
                    assert result.rewrapped.from_version == 1, i
                    assert result.rewrapped.to_version == 2, i

    run(main())


def test_a_cancelled_call_is_not_counted_or_audited_as_ok(
    tmp_path: Path, token_config: TokenConfig, ring: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The caller gives up (deadline) while the sidecar works: metrics and the audit line say
    cancelled, never ok."""

    async def main() -> str:
        async with running_sidecar(tmp_path, token_config, metrics_port=0) as sidecar:
            async with HsmClient.unix(sidecar.config.socket or "") as hsm:
                await hsm.create_key_version(ring, 1)
                key = await hsm.generate_data_key(ring, BINDING)
            release = asyncio.Event()
            real = sidecar.service.decrypt

            async def slow(*args: object, **kwargs: object) -> bytes:
                await release.wait()
                return await real(*args, **kwargs)  # type: ignore[arg-type]

            sidecar.service.decrypt = slow  # type: ignore[method-assign]
            async with HsmClient.unix(sidecar.config.socket or "", timeout=0.3) as hsm:
                with pytest.raises(HsmError):
                    await hsm.decrypt(key.wrapped, BINDING, allow_plaintext_export=True)
            await asyncio.sleep(0.3)
            release.set()
            url = f"http://127.0.0.1:{sidecar.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url).read().decode())

    with caplog.at_level(logging.INFO, logger=AUDIT_LOGGER):
        body = run(main())
    assert 'kustody_hsm_requests_total{op="Decrypt",outcome="cancelled"} 1.0' in body
    assert 'op="Decrypt",outcome="ok"' not in body
    decrypts = [
        json.loads(r.getMessage())
        for r in caplog.records
        if r.name == AUDIT_LOGGER and '"rpc":"Decrypt"' in r.getMessage()
    ]
    assert [(d["peer"], d["key_ring"], d["outcome"]) for d in decrypts] == [
        ("unix", ring, "cancelled")
    ]
