"""The Kubernetes KMS v2 plugin on its own unix socket, as kube-apiserver calls it."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest
from kustody.api._proto import kms_v2_pb2 as kms
from kustody.api._proto import kms_v2_pb2_grpc as kms_grpc
from kustody.api.token import TokenConfig
from kustody.domain.keyversion import VersionState

from .conftest import run, running_sidecar


def test_kms_v2_status_encrypt_decrypt_and_rotation(
    tmp_path: Path, token_config: TokenConfig, ring: str
) -> None:
    kms_socket = tmp_path / "kms.sock"

    async def main() -> None:
        async with (
            running_sidecar(
                tmp_path,
                token_config,
                kms_socket=kms_socket,
                kms_key_ring=ring,
                kms_create_if_missing=True,
            ) as sidecar,
            grpc.aio.insecure_channel(f"unix:{kms_socket}") as channel,
        ):
            assert oct(os.stat(kms_socket).st_mode & 0o777) == "0o600"
            stub = kms_grpc.KeyManagementServiceStub(channel)
            status = await stub.Status(kms.StatusRequest())
            assert status.version == "v2"
            assert status.healthz == "ok"
            assert status.key_id.startswith(f"{ring}:v1:")

            seed = os.urandom(32)
            sealed = await stub.Encrypt(kms.EncryptRequest(plaintext=seed, uid="u1"))
            assert sealed.key_id == status.key_id
            assert len(sealed.ciphertext) < 1024
            assert seed not in sealed.ciphertext
            opened = await stub.Decrypt(
                kms.DecryptRequest(ciphertext=sealed.ciphertext, uid="u2", key_id=sealed.key_id)
            )
            assert opened.plaintext == seed

            # A ciphertext presented under another key_id does not decrypt.
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Decrypt(
                    kms.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id + "x")
                )
            assert dict(info.value.trailing_metadata() or ())["kustody-reason"] == "AAD_MISMATCH"
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Decrypt(kms.DecryptRequest(ciphertext=b"junk", key_id=sealed.key_id))
            assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT

            # Rotation: a new primary version changes key_id; old ciphertexts still decrypt.
            await sidecar.service.create_key_version(ring, 2)
            rotated = await stub.Status(kms.StatusRequest())
            assert rotated.key_id.startswith(f"{ring}:v2:")
            assert rotated.key_id != status.key_id
            resealed = await stub.Encrypt(kms.EncryptRequest(plaintext=seed))
            assert resealed.key_id == rotated.key_id
            old = await stub.Decrypt(
                kms.DecryptRequest(ciphertext=sealed.ciphertext, key_id=sealed.key_id)
            )
            assert old.plaintext == seed

            # No usable version: healthz says why.
            await sidecar.service.set_version_state(ring, 2, VersionState.DISABLED)
            await sidecar.service.set_version_state(ring, 1, VersionState.DISABLED)
            unhealthy = await stub.Status(kms.StatusRequest())
            assert unhealthy.healthz != "ok"
            assert "NO_PRIMARY_VERSION" in unhealthy.healthz

    run(main())
