"""One-shot ciphertext, format v1: AES-256-GCM with a random nonce and the key id in front.

Layout (all integers big-endian; see docs/keyset-format.md)::

    offset  size  field
    0       1     format byte 0x01
    1       4     key id (uint32) of the keyset key that encrypted it
    5       12    nonce (os.urandom)
    17      n+16  AES-256-GCM ciphertext of the n-byte plaintext ‖ 16-byte tag

The GCM associated data is the first 5 bytes (format byte ‖ key id) followed by the caller's
associated data, so changing the header or the associated data fails authentication. Only
this module and :mod:`kustody.client.aead_stream` know the byte layouts; the caller never
chooses a nonce or an algorithm. ``_seal`` takes the nonce as an argument: it is the private
seam the test-vector generator uses, never the public API.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable

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

# From this size on, the ciphertext is written straight into the bytes object returned (see
# _new_bytes); below it, concatenating the header and AESGCM's output costs less than the calls.
_DIRECT_FROM = 64 * 1024

_HEADER = struct.Struct(">BI")
_unpack_header = _HEADER.unpack_from


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
    fmt, key_id = _unpack_header(ciphertext)
    if fmt != FORMAT_ONE_SHOT and fmt != FORMAT_STREAM:
        raise MalformedCiphertext(
            f"unknown ciphertext format byte 0x{fmt:02x}: not a Kustody keyset ciphertext "
            "(one-shot ciphertexts start with 0x01, streams with 0x02)"
        )
    return fmt, key_id


def seal(aead: AESGCM, head: bytes, plaintext: bytes, associated_data: bytes) -> bytes:
    """Encrypt under a fresh random nonce; ``head`` is ``header(FORMAT_ONE_SHOT, key_id)``."""
    return _seal(aead, head, plaintext, associated_data, os.urandom(NONCE_BYTES))


def _seal(
    aead: AESGCM, head: bytes, plaintext: bytes, associated_data: bytes, nonce: bytes
) -> bytes:
    if len(plaintext) > MAX_PLAINTEXT_BYTES or len(associated_data) > MAX_ASSOCIATED_DATA_BYTES:
        raise MessageTooLarge(
            f"one-shot messages hold at most {MAX_PLAINTEXT_BYTES} bytes of plaintext and "
            f"{MAX_ASSOCIATED_DATA_BYTES} bytes of associated data; use encrypt_stream"
        )
    if len(nonce) != NONCE_BYTES or len(head) != HEADER_BYTES:
        raise ValueError("nonce must be 12 bytes and header 5")  # only the private seam
    aad = head + associated_data
    size = ONE_SHOT_OVERHEAD + len(plaintext)
    if size < _DIRECT_FROM or _new_bytes is None:
        return head + nonce + aead.encrypt(nonce, plaintext, aad)
    out, view = _new_bytes(size)
    view[:HEADER_BYTES] = head
    view[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES] = nonce
    aead.encrypt_into(nonce, plaintext, aad, view[HEADER_BYTES + NONCE_BYTES :])
    view.release()
    return out


def _direct_bytes() -> Callable[[int], tuple[bytes, memoryview]] | None:
    """A way to fill a new ``bytes`` object in place, or None where CPython's C API is absent.

    Returning ``header + nonce + AESGCM.encrypt(...)`` copies the whole ciphertext once more:
    about 15% of the time at 1 MiB, and with glibc, two large blocks alive per call make it
    return and re-fault the heap top every call (ten times slower on a loaded machine). The C
    API allows writing into a bytes object made by ``PyBytes_FromStringAndSize(NULL, n)`` until
    it is shared (see ``PyBytes_AsString``); AESGCM.encrypt_into writes the ciphertext there,
    checking that the view is exactly len(plaintext) + 16 bytes, and the ctypes array bounds
    every other write. Nothing but ciphertext and the public header is written this way.
    """
    try:
        import ctypes

        api = ctypes.pythonapi
        create = api.PyBytes_FromStringAndSize
        address = api.PyBytes_AsString
    except (ImportError, AttributeError):  # not CPython
        return None
    create.restype = ctypes.py_object
    create.argtypes = (ctypes.c_char_p, ctypes.c_ssize_t)
    address.restype = ctypes.c_void_p
    address.argtypes = (ctypes.py_object,)

    def new(size: int) -> tuple[bytes, memoryview]:
        out: bytes = create(None, size)
        buffer = (ctypes.c_char * size).from_address(address(out))
        return out, memoryview(buffer).cast("B")

    return new


_new_bytes = _direct_bytes()


def unseal(aead: AESGCM, ciphertext: bytes, associated_data: bytes) -> bytes:
    """Decrypt a one-shot ciphertext whose header :func:`peek` already read and whose key the
    caller picked by its key id."""
    size = len(ciphertext)
    if size < ONE_SHOT_OVERHEAD:
        raise MalformedCiphertext(
            f"one-shot ciphertext is {size} bytes, shorter than the {ONE_SHOT_OVERHEAD} bytes "
            "of header, nonce and tag: it was truncated"
        )
    view: bytes | memoryview = ciphertext
    if size >= _DIRECT_FROM:  # slice without copying
        if size - ONE_SHOT_OVERHEAD > MAX_PLAINTEXT_BYTES or (
            len(associated_data) > MAX_ASSOCIATED_DATA_BYTES
        ):
            raise MessageTooLarge("ciphertext or associated data is larger than one-shot allows")
        view = memoryview(ciphertext)
    try:
        return aead.decrypt(
            view[HEADER_BYTES : HEADER_BYTES + NONCE_BYTES],
            view[HEADER_BYTES + NONCE_BYTES :],
            bytes(view[:HEADER_BYTES]) + associated_data,
        )
    except InvalidTag:
        raise DecryptionFailed(
            "the ciphertext failed authentication: it was changed or truncated, or the "
            "associated data differs from the one it was encrypted with"
        ) from None
