"""Capability profiles at work: the FIPS-style token-IV profile (wrap, unwrap, rotate, KMS) on
Kryoptic, its refusal on SoftHSM2, and envelopes opening across profiles.

Neither implementation can be configured to *refuse* caller-supplied GCM IVs (SoftHSM2 has no
FIPS mode; Kryoptic's ``fips`` build only flags caller IVs as non-approved through its FIPS
indicator, and needs OpenSSL 4.0). So the refusal is the sidecar's: ``--gcm-iv token`` makes
the worker seal only with IVs the token generates (PKCS#11 3.0 C_EncryptMessage) and refuse to
serve where the token cannot, which is what a FIPS-mode HSM imposes from its side.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from kustody.api.errors import HsmError, Reason
from kustody.api.token import TokenConfig
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from kustody.domain.keyversion import VersionState
from kustody.errors import UserError
from kustody.sidecar.connection import HsmConnection
from kustody.sidecar.keyservice import GenerateRequest, KeyService, RewrapRequest

from .conftest import run

BINDING = Binding("team-a", "db", {"app": "db"})


def _token(kind: str, directory: Path) -> DevToken:
    try:
        return create_token(directory, "profiles", kind=kind)
    except UserError as exc:
        if kind == "kryoptic" and os.environ.get("KUSTODY_SKIP_KRYOPTIC") == "1":
            pytest.skip(f"KUSTODY_SKIP_KRYOPTIC=1: {exc}")
        raise


def _service(token: DevToken, gcm_iv: str) -> tuple[HsmConnection, KeyService]:
    os.environ.update(token.env)
    conn = HsmConnection(
        TokenConfig(token.module, token.label, token.pin_file, gcm_iv=gcm_iv), min_destroy_delay=0
    )
    return conn, KeyService(conn)


def test_token_iv_profile_wraps_unwraps_and_rotates_on_kryoptic(tmp_path: Path) -> None:
    token = _token("kryoptic", tmp_path / "kryoptic")

    async def main() -> None:
        conn, keys = _service(token, "token")
        health = await conn.start()
        assert health.serving, health
        assert "gcm-iv=token" in health.message
        try:
            await keys.create_key_version("fips", 1)
            first = await keys.generate_data_key(
                GenerateRequest("fips", BINDING, include_plaintext=True)
            )
            assert await keys.decrypt(first.envelope, BINDING) == first.plaintext
            nonces = set()
            for _ in range(20):
                dk = await keys.generate_data_key(GenerateRequest("fips", BINDING))
                nonces.add(dk.envelope.nonce)
            assert len(nonces) == 20
            # Rotate: version 2, re-wrap, disable version 1.
            await keys.create_key_version("fips", 2)
            moved = await keys.rewrap(RewrapRequest(first.envelope, BINDING))
            assert moved.key.version == 2
            assert await keys.decrypt(moved, BINDING) == first.plaintext
            await keys.set_version_state("fips", 1, VersionState.DISABLED)
            with pytest.raises(HsmError) as disabled:
                await keys.decrypt(first.envelope, BINDING)
            assert disabled.value.reason is Reason.VERSION_DISABLED
            # KMS v2 seeds are sealed on the same path.
            kms_envelope, _ = await keys.seal_kms("fips", None, bytes(32))
            assert kms_envelope.key.version == 2
        finally:
            await conn.close()
        # The same envelopes open under the caller-IV profile: nothing about the profile is
        # in the envelope, because decryption always takes the IV from it.
        conn2, keys2 = _service(token, "auto")
        health2 = await conn2.start()
        assert "gcm-iv=caller" in health2.message, health2
        try:
            assert await keys2.decrypt(moved, BINDING) == first.plaintext
        finally:
            await conn2.close()

    run(main())


def test_token_iv_profile_is_refused_where_the_token_cannot_make_ivs(tmp_path: Path) -> None:
    token = _token("softhsm2", tmp_path / "softhsm")

    async def main() -> None:
        conn, keys = _service(token, "token")
        health = await conn.start()
        try:
            assert not health.serving
            assert health.reason is Reason.TOKEN_INCOMPATIBLE
            assert "--gcm-iv token" in health.message
            with pytest.raises(HsmError) as refused:
                await keys.create_key_version("fips", 1)
            assert refused.value.reason is Reason.TOKEN_UNAVAILABLE
        finally:
            await conn.close()

    run(main())
