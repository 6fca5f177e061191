"""Adopt only keys that are what they claim: a co-tenant of a shared HSM partition (same
token, same user PIN) plants AES keys under Kustody's label and ID for a KEK version. The
real `kustody hsm` process refuses to adopt, describe or use them (KEY_NOT_TRUSTED), and the
keys it generates itself pass the same checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.api.client import HsmClient
from kustody.api.errors import HsmError, Reason
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope, header_for
from kustody.domain.keyversion import KeyVersionRef, VersionState

from .conftest import run, start_process

BINDING = Binding("shop", "db-key", {"app": "db"})
KNOWN = bytes(range(32))  # the planted key's value, known to the attacker (as in cotenant.py)
COTENANT = Path(__file__).with_name("cotenant.py")


@pytest.fixture
def own_token(tmp_path: Path) -> DevToken:
    return create_token(tmp_path / "token", "cotenant-test")


def _cotenant(token: DevToken, action: str, ref: KeyVersionRef) -> str:
    """Run ``cotenant.py`` as another user of the partition (same token, same user PIN)."""
    result = subprocess.run(
        [
            sys.executable, str(COTENANT), str(token.module), token.label, str(token.pin_file),
            action, ref.key_ring, str(ref.version),
        ],
        env={**os.environ, **token.env}, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return result.stdout


async def _refused(call: Awaitable[Any]) -> HsmError:
    with pytest.raises(HsmError) as info:
        await call
    assert info.value.reason is Reason.KEY_NOT_TRUSTED, info.value
    return info.value


def _forged_envelope(ref: KeyVersionRef) -> str:
    """A wrapped key the attacker made offline with the value it planted."""
    nonce = bytes(12)
    aad = header_for(ref) + BINDING.encode()
    return Envelope(ref, nonce, AESGCM(KNOWN).encrypt(nonce, bytes(32), aad)).to_text()


def test_planted_keys_are_never_adopted_described_or_used(
    tmp_path: Path, own_token: DevToken
) -> None:
    v1, v2 = KeyVersionRef("pay", 1), KeyVersionRef("pay", 2)
    planted = {
        KeyVersionRef("orders", 1): ("known-value", "CKA_LOCAL is false"),
        KeyVersionRef("ledger", 1): ("imported-locked", "CKA_LOCAL is false"),
        KeyVersionRef("audit", 1): ("wrapping-key", "CKA_WRAP is true"),
    }
    # Kustody creates pay/v1 and stops. (SoftHSM2 does not support a second process writing
    # a token while the sidecar uses it, so the co-tenant plants while it is stopped; on a real
    # shared partition it could do so at any time, and CreateKeyVersion searches the token.)
    proc = start_process(tmp_path, own_token)

    async def first() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            assert (await hsm.create_key_version("pay", 1)).state is VersionState.ENABLED

    try:
        run(first())
    finally:
        proc.stop()
    # Kustody's own key passes the checks (and is what the checks describe).
    assert json.loads(_cotenant(own_token, "attributes", v1)) == {
        "local": True,
        "never_extractable": True,
        "sensitive": True,
        "extractable": False,
        "wrap": False,
        "unwrap": False,
        "value_len": 32,
    }
    # The co-tenant plants the version a rotation would create next, and versions of rings
    # Kustody has not created yet.
    _cotenant(own_token, "known-value", v2)
    for ref, (action, _) in planted.items():
        _cotenant(own_token, action, ref)
    proc = start_process(tmp_path, own_token)

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            good = await hsm.generate_data_key("pay", BINDING, version=1)
            error = await _refused(hsm.create_key_version("pay", 2))
            assert "pay/v2" in error.message
            assert "CKA_LOCAL is false" in error.message
            assert KNOWN.hex() not in error.message
            await _refused(hsm.describe_key("pay"))
            await _refused(hsm.generate_data_key("pay", BINDING))  # v2 is the highest ENABLED
            await _refused(hsm.generate_data_key("pay", BINDING, version=2))
            await _refused(hsm.rewrap(good.wrapped, BINDING, to_version=2))
            forged = _forged_envelope(v2)
            await _refused(hsm.decrypt(forged, BINDING, allow_plaintext_export=True))
            await _refused(hsm.set_version_state("pay", 2, VersionState.DISABLED))
            await _refused(hsm.destroy_version("pay", 2))
            # The trusted version still works when named.
            assert (await hsm.rewrap(good.wrapped, BINDING, to_version=1)).to_version == 1

            for ref, (_, why) in planted.items():
                error = await _refused(hsm.create_key_version(ref.key_ring, ref.version))
                assert why in error.message, error.message
                await _refused(hsm.describe_key(ref.key_ring))
                await _refused(hsm.generate_data_key(ref.key_ring, BINDING))
                await _refused(
                    hsm.decrypt(_forged_envelope(ref), BINDING, allow_plaintext_export=True)
                )

    try:
        run(main())
    finally:
        log = proc.stop()
    assert "refusing to adopt the token object for pay/v2" in log
    assert KNOWN.hex() not in log
