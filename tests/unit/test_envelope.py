"""The envelope parser is strict: anything but a well-formed envelope is MalformedEnvelope."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.envelope import (
    MAX_CIPHERTEXT_BYTES,
    NONCE_BYTES,
    TEXT_PREFIX,
    Envelope,
    header_for,
)
from kustody.domain.errors import MalformedEnvelope
from kustody.domain.keyversion import KeyVersionRef

key_rings = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,40}[a-z0-9])?", fullmatch=True)
envelopes = st.builds(
    Envelope,
    key=st.builds(KeyVersionRef, key_rings, st.integers(1, 2**32 - 1)),
    nonce=st.binary(min_size=NONCE_BYTES, max_size=NONCE_BYTES),
    ciphertext=st.binary(min_size=17, max_size=200),
)


def _sample() -> Envelope:
    return Envelope(KeyVersionRef("payments", 3), bytes(range(12)), b"\xaa" * 49)


def test_binary_layout_is_as_documented() -> None:
    raw = _sample().to_bytes()
    assert raw[:4] == b"KSTY"
    assert raw[4] == 1
    assert raw[5] == len("payments")
    assert raw[6:14] == b"payments"
    assert raw[14:18] == (3).to_bytes(4, "big")
    assert raw[18:30] == bytes(range(12))
    assert raw[30:] == b"\xaa" * 49
    assert header_for(KeyVersionRef("payments", 3)) == raw[:18]


def test_text_form_has_prefix_and_canonical_base64() -> None:
    text = _sample().to_text()
    assert text.startswith("kustody:v1:")
    assert base64.b64decode(text[len(TEXT_PREFIX) :]) == _sample().to_bytes()


@given(envelopes)
def test_round_trip(envelope: Envelope) -> None:
    assert Envelope.from_bytes(envelope.to_bytes()) == envelope
    assert Envelope.from_text(envelope.to_text()) == envelope


@given(st.binary(max_size=400))
def test_random_bytes_parse_or_raise_typed_error(raw: bytes) -> None:
    try:
        parsed = Envelope.from_bytes(raw)
    except MalformedEnvelope:
        return
    assert parsed.to_bytes() == raw  # whatever parses is exactly what was given


@given(st.text(max_size=300))
def test_random_text_parse_or_raise_typed_error(text: str) -> None:
    try:
        parsed = Envelope.from_text(text)
    except MalformedEnvelope:
        return
    assert parsed.to_text() == text


@given(envelopes, st.data())
def test_truncated_envelopes_are_malformed_or_shorter_ciphertext(
    envelope: Envelope, data: st.DataObject
) -> None:
    raw = envelope.to_bytes()
    cut = data.draw(st.integers(0, len(raw) - 1))
    try:
        parsed = Envelope.from_bytes(raw[:cut])
    except MalformedEnvelope:
        return
    # Cutting into the ciphertext still parses; the AEAD tag then fails in the token
    # (tests/hsm). The parser never invents bytes.
    assert parsed.to_bytes() == raw[:cut]
    assert parsed.ciphertext != envelope.ciphertext


@given(envelopes, st.data())
def test_bit_flips_never_yield_the_same_envelope(envelope: Envelope, data: st.DataObject) -> None:
    raw = bytearray(envelope.to_bytes())
    bit = data.draw(st.integers(0, len(raw) * 8 - 1))
    raw[bit // 8] ^= 1 << (bit % 8)
    try:
        parsed = Envelope.from_bytes(bytes(raw))
    except MalformedEnvelope:
        return
    assert parsed != envelope
    assert parsed.to_bytes() == bytes(raw)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "bad magic"),
        (b"XSTY\x01\x01a", "bad magic"),
        (b"KSTY\x02\x01a" + bytes(40), "format version 2"),
        (b"KSTY\x01\x00" + bytes(40), "truncated"),
        (b"KSTY\x01\x01a\x00\x00\x00\x01" + bytes(12 + 16), "truncated"),
        (b"KSTY\x01\x01A\x00\x00\x00\x01" + bytes(12 + 17), "invalid KeyRing"),
        (b"KSTY\x01\x01a\x00\x00\x00\x00" + bytes(12 + 17), "invalid KeyRing or version"),
        (b"KSTY\x01\x01a\x00\x00\x00\x01" + bytes(12 + MAX_CIPHERTEXT_BYTES + 1), "too long"),
    ],
)
def test_malformed_binary_names_the_problem(raw: bytes, message: str) -> None:
    with pytest.raises(MalformedEnvelope, match=message):
        Envelope.from_bytes(raw)


@pytest.mark.parametrize(
    "text",
    [
        "vault:v1:AAAA",
        "kustody:v2:" + base64.b64encode(_sample().to_bytes()).decode(),
        _sample().to_text() + "\n",
        _sample().to_text().rstrip("="),
        _sample().to_text().replace("kustody:v1:", "kustody:v1: "),
        "kustody:v1:" + "é" * 10,
        "kustody:v1:" + "A" * 100_000,
    ],
)
def test_malformed_text_is_rejected(text: str) -> None:
    with pytest.raises(MalformedEnvelope):
        Envelope.from_text(text)


def test_non_canonical_base64_is_rejected() -> None:
    text = _sample().to_text()
    # Flip the unused low bits of the last base64 digit before the padding.
    body = text[len(TEXT_PREFIX) :]
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    stripped = body.rstrip("=")
    last = alphabet.index(stripped[-1])
    tweaked = stripped[:-1] + alphabet[last ^ 1] + body[len(stripped) :]
    assert base64.b64decode(tweaked) == base64.b64decode(body)
    with pytest.raises(MalformedEnvelope, match="canonical"):
        Envelope.from_text(TEXT_PREFIX + tweaked)
