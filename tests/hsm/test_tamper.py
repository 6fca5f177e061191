"""Property tests on the real token: altered envelopes never decrypt, always a typed error."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kustody.api.errors import HsmError, Reason
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.domain.errors import MalformedEnvelope
from kustody.sidecar.keyservice import GenerateRequest, KeyService

from .conftest import run

BINDING = Binding("ns", "dk", {"a": "b"})
RING = "tamper"


@pytest.fixture(scope="module")
def sealed(key_service: KeyService) -> tuple[bytes, bytes]:
    run(key_service.create_key_version(RING, 1))
    run(key_service.create_key_version(RING, 2))
    key = run(
        key_service.generate_data_key(
            GenerateRequest(RING, BINDING, version=1, include_plaintext=True)
        )
    )
    assert key.plaintext is not None
    return key.envelope.to_bytes(), key.plaintext


def _open(key_service: KeyService, raw: bytes) -> bytes | Reason:
    try:
        envelope = Envelope.from_bytes(raw)
    except MalformedEnvelope:
        return Reason.MALFORMED_ENVELOPE
    try:
        return run(key_service.decrypt(envelope, BINDING))
    except HsmError as exc:
        return exc.reason


_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
_EXPECTED = {
    Reason.MALFORMED_ENVELOPE,
    Reason.AAD_MISMATCH,
    Reason.VERSION_NOT_FOUND,
}


def test_untouched_envelope_opens(key_service: KeyService, sealed: tuple[bytes, bytes]) -> None:
    raw, plaintext = sealed
    assert _open(key_service, raw) == plaintext


@_SETTINGS
@given(st.data())
def test_bit_flips_fail_authentication(
    key_service: KeyService, sealed: tuple[bytes, bytes], data: st.DataObject
) -> None:
    raw, _ = sealed
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    flipped = bytearray(raw)
    flipped[bit // 8] ^= 1 << (bit % 8)
    assert _open(key_service, bytes(flipped)) in _EXPECTED


@_SETTINGS
@given(st.data())
def test_truncations_fail(
    key_service: KeyService, sealed: tuple[bytes, bytes], data: st.DataObject
) -> None:
    raw, _ = sealed
    cut = data.draw(st.integers(0, len(raw) - 1))
    assert _open(key_service, raw[:cut]) in _EXPECTED


@_SETTINGS
@given(st.binary(max_size=120))
def test_random_bytes_fail(key_service: KeyService, raw: bytes) -> None:
    assert _open(key_service, raw) in _EXPECTED


@_SETTINGS
@given(st.data())
def test_spliced_envelopes_fail(
    key_service: KeyService, sealed: tuple[bytes, bytes], data: st.DataObject
) -> None:
    """Arbitrary byte replacements anywhere (including the KEK version and KeyRing)."""
    raw, _ = sealed
    start = data.draw(st.integers(0, len(raw) - 1))
    patch = data.draw(st.binary(min_size=1, max_size=8))
    spliced = raw[:start] + patch + raw[start + len(patch) :]
    if spliced == raw:
        return
    assert _open(key_service, spliced) in _EXPECTED | {Reason.INVALID_ARGUMENT}
