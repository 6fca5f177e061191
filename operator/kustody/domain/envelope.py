"""The wrapped-key envelope: a self-describing, versioned binary format and its text form.

Binary layout, format version 1 (all integers big-endian)::

    offset  size  field
    0       4     magic "KSTY"
    4       1     format version (1)
    5       1     L = length of the KeyRing name (1..253)
    6       L     KeyRing name (ASCII DNS-1123 subdomain)
    6+L     4     KEK version (uint32, >= 1)
    10+L    12    AES-GCM nonce (from the token RNG)
    22+L    n     AES-256-GCM ciphertext ‖ 16-byte tag (17 <= n <= 4112)

Bytes 0..10+L are the *header*; it is the first part of the associated data, so changing any
header byte makes authentication fail. The text form, used in Secrets, is
``kustody:v1:`` followed by the canonical padded standard base64 of the binary form.
"""

from __future__ import annotations

import base64
import binascii
import functools
import struct
from dataclasses import dataclass

from kustody.domain.errors import InvalidArgument, MalformedEnvelope
from kustody.domain.keyversion import KeyVersionRef

MAGIC = b"KSTY"
FORMAT_VERSION = 1
TEXT_PREFIX = "kustody:v1:"
NONCE_BYTES = 12
TAG_BYTES = 16
MAX_PLAINTEXT_BYTES = 4096
# A data key's length in bytes, as the key service generates it (DataKey specs allow 16-64).
MIN_DEK_BYTES = 16
MAX_DEK_BYTES = 512
MAX_CIPHERTEXT_BYTES = MAX_PLAINTEXT_BYTES + TAG_BYTES
MAX_BINARY_BYTES = 4 + 1 + 1 + 253 + 4 + NONCE_BYTES + MAX_CIPHERTEXT_BYTES
MAX_TEXT_CHARS = len(TEXT_PREFIX) + 4 * ((MAX_BINARY_BYTES + 2) // 3)


@dataclass(frozen=True)
class Envelope:
    """A DEK sealed under one KEK version. Holds no plaintext."""

    key: KeyVersionRef
    nonce: bytes
    ciphertext: bytes  # ciphertext ‖ tag

    def __post_init__(self) -> None:
        if len(self.nonce) != NONCE_BYTES:
            raise InvalidArgument(f"nonce must be {NONCE_BYTES} bytes")
        if not TAG_BYTES < len(self.ciphertext) <= MAX_CIPHERTEXT_BYTES:
            raise InvalidArgument("ciphertext length is out of range")

    @property
    def header(self) -> bytes:
        return header_for(self.key)

    def to_bytes(self) -> bytes:
        return self.header + self.nonce + self.ciphertext

    def to_text(self) -> str:
        return TEXT_PREFIX + base64.b64encode(self.to_bytes()).decode("ascii")

    @classmethod
    def from_bytes(cls, raw: bytes) -> Envelope:
        return _parse(raw)

    @classmethod
    def from_text(cls, text: str) -> Envelope:
        if len(text) > MAX_TEXT_CHARS:
            raise MalformedEnvelope("envelope text is too long")
        if not text.startswith(TEXT_PREFIX):
            raise MalformedEnvelope(f"envelope text does not start with {TEXT_PREFIX!r}")
        body = text[len(TEXT_PREFIX) :]
        try:
            raw = base64.b64decode(body.encode("ascii"), validate=True)
        except (UnicodeEncodeError, binascii.Error, ValueError):
            raise MalformedEnvelope("envelope text is not valid base64") from None
        if base64.b64encode(raw).decode("ascii") != body:
            raise MalformedEnvelope("envelope text is not canonical base64")
        return _parse(raw)


@functools.lru_cache(maxsize=4096)
def header_for(key: KeyVersionRef) -> bytes:
    ring = key.key_ring.encode("ascii")
    return MAGIC + bytes([FORMAT_VERSION, len(ring)]) + ring + struct.pack(">I", key.version)


def _parse(raw: bytes) -> Envelope:
    if not isinstance(raw, bytes | bytearray | memoryview):
        raise MalformedEnvelope("envelope is not bytes")
    raw = bytes(raw)
    if len(raw) > MAX_BINARY_BYTES:
        raise MalformedEnvelope("envelope is too long")
    if len(raw) < 6 or raw[:4] != MAGIC:
        raise MalformedEnvelope("not a Kustody envelope (bad magic)")
    if raw[4] != FORMAT_VERSION:
        raise MalformedEnvelope(f"unsupported envelope format version {raw[4]}")
    ring_len = raw[5]
    fixed_end = 6 + ring_len + 4
    if ring_len == 0 or len(raw) < fixed_end + NONCE_BYTES + TAG_BYTES + 1:
        raise MalformedEnvelope("envelope is truncated")
    try:
        ring = raw[6 : 6 + ring_len].decode("ascii")
        (version,) = struct.unpack(">I", raw[6 + ring_len : fixed_end])
        key = KeyVersionRef(ring, version)
    except (UnicodeDecodeError, InvalidArgument):
        raise MalformedEnvelope("envelope names an invalid KeyRing or version") from None
    nonce = raw[fixed_end : fixed_end + NONCE_BYTES]
    try:
        return Envelope(key, nonce, raw[fixed_end + NONCE_BYTES :])
    except InvalidArgument:
        raise MalformedEnvelope("envelope ciphertext is too long") from None
