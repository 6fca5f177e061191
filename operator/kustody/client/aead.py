"""One-shot ciphertext, format v1: AES-256-GCM with a random nonce and the key id in front.

Layout (all integers big-endian; see docs/keyset-format.md)::

    offset  size  field
    0       1     format byte 0x01
    1       4     key id (uint32) of the keyset key that encrypted it
    5       12    nonce (os.urandom)
    17      n+16  AES-256-GCM ciphertext of the n-byte plaintext ‖ 16-byte tag

The GCM associated data is bytes 0..5 (format byte ‖ key id) followed by the caller's
associated data, so changing the header or the associated data fails authentication. Only
this module and :mod:`kustody.client.aead_stream` know the byte layouts; the caller never
chooses a nonce or an algorithm. ``_seal`` takes the nonce as an argument: it is the private
seam the test-vector generator uses, never the public API.
"""

from __future__ import annotations

import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from kustody.client.aead_errors import DecryptionFailed, MalformedCiphertext, MessageTooLarge

FORMAT_ONE_SHOT = 0x01
FORMAT_STREAM = 0x02
KEY_BYTES = 32
KEY_ID_BYTES = 4
NONCE_BYTES = 12
TAG_BYTES = 16
HEADER_BYTES = 1 + KEY_ID_BYTES  # format byte ‖ key id: both formats start with it
ONE_SHOT_OVERHEAD = HEADER_BYTES + NONCE_BYTES + TAG_BYTES
# cryptography's AESGCM refuses more than this many bytes of data or associated data per call.
MAX_AESGCM_INPUT = 2**31 - 1
MAX_PLAINTEXT_BYTES = MAX_AESGCM_INPUT
MAX_ASSOCIATED_DATA_BYTES = MAX_AESGCM_INPUT - HEADER_BYTES

# Large messages are encrypted into a per-thread buffer that is reused, then copied once into
# the returned bytes. Concatenating the header with a fresh ciphertext instead keeps two large
# blocks alive per call, which makes glibc return and re-fault the heap top every call (about
# ten times slower at 1 MiB on a loaded machine). Ciphertext only, never plaintext, stays in it.
_SCRATCH_FROM = 64 * 1024
_SCRATCH_MAX = 8 * 1024 * 1024
_local = threading.local()

_HEADER = struct.Struct(">BI")


def new_aead(dek: bytes) -> AESGCM:
    """The AES-256-GCM primitive for one DEK (the caller checked it is 32 bytes)."""
    return AESGCM(dek)


def header(fmt: int, key_id: int) -> bytes:
    """The 5 bytes both formats start with."""
    return _HEADER.pack(fmt, key_id)


def peek(ciphertext: bytes) -> tuple[int, int]:
    """The format byte and key id of a ciphertext (one-shot or a stream's first bytes),
    checked only for shape. Authentication happens when decrypting."""
    if len(ciphertext) < HEADER_BYTES:
        raise MalformedCiphertext(
            f"ciphertext is {len(ciphertext)} bytes, shorter than its {HEADER_BYTES}-byte header"
        )
    fmt, key_id = _HEADER.unpack_from(ciphertext)
    if fmt not in (FORMAT_ONE_SHOT, FORMAT_STREAM):
        raise MalformedCiphertext(
            f"unknown ciphertext format byte 0x{fmt:02x}: not a Kustody keyset ciphertext "
            "(one-shot ciphertexts start with 0x01, streams with 0x02)"
        )
    return int(fmt), int(key_id)


def seal(aead: AESGCM, key_id: int, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt under a fresh random nonce."""
    return _seal(aead, key_id, plaintext, associated_data, os.urandom(NONCE_BYTES))


def _seal(
    aead: AESGCM, key_id: int, plaintext: bytes, associated_data: bytes, nonce: bytes
) -> bytes:
    if len(plaintext) > MAX_PLAINTEXT_BYTES or len(associated_data) > MAX_ASSOCIATED_DATA_BYTES:
        raise MessageTooLarge(
            f"one-shot messages hold at most {MAX_PLAINTEXT_BYTES} bytes of plaintext and "
            f"{MAX_ASSOCIATED_DATA_BYTES} bytes of associated data; use encrypt_stream"
        )
    if len(nonce) != NONCE_BYTES:
        raise ValueError("nonce must be 12 bytes")  # only the private seam can get here
    head = header(FORMAT_ONE_SHOT, key_id)
    aad = head + associated_data
    size = ONE_SHOT_OVERHEAD + len(plaintext)
    if not _SCRATCH_FROM <= size <= _SCRATCH_MAX:
        return head + nonce + aead.encrypt(nonce, plaintext, aad)
    scratch: bytearray | None = getattr(_local, "scratch", None)
    if scratch is None or len(scratch) < size:
        scratch = bytearray(size)
        _local.scratch = scratch
    view = memoryview(scratch)
    view[:HEADER_BYTES] = head
    view[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES] = nonce
    aead.encrypt_into(nonce, plaintext, aad, view[HEADER_BYTES + NONCE_BYTES : size])
    return bytes(view[:size])


def unseal(aead: AESGCM, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Decrypt a one-shot ciphertext whose header :func:`peek` already read and whose key the
    caller picked by its key id."""
    if len(ciphertext) < ONE_SHOT_OVERHEAD:
        raise MalformedCiphertext(
            f"one-shot ciphertext is {len(ciphertext)} bytes, shorter than the "
            f"{ONE_SHOT_OVERHEAD} bytes of header, nonce and tag: it was truncated"
        )
    if len(ciphertext) - ONE_SHOT_OVERHEAD > MAX_PLAINTEXT_BYTES or (
        len(associated_data) > MAX_ASSOCIATED_DATA_BYTES
    ):
        raise MessageTooLarge("ciphertext or associated data is larger than one-shot allows")
    view = memoryview(ciphertext)
    nonce = view[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES]
    aad = bytes(view[:HEADER_BYTES]) + associated_data
    try:
        return aead.decrypt(nonce, view[HEADER_BYTES + NONCE_BYTES :], aad)
    except InvalidTag:
        raise DecryptionFailed(
            "the ciphertext failed authentication: it was changed or truncated, or the "
            "associated data differs from the one it was encrypted with"
        ) from None
