"""Streaming ciphertext, format v1: constant memory for payloads of any size.

The construction is Tink's AES-GCM-HKDF streaming AEAD, simplified. Layout (big-endian)::

    header (32 bytes)
    offset  size  field
    0       1     format byte 0x02
    1       4     key id (uint32)
    5       4     segment size S (plaintext bytes per segment, 4 KiB .. 64 MiB)
    9       16    salt (os.urandom)
    25      7     nonce prefix (os.urandom)
    segments
    32      S+16  segment 0: AES-256-GCM(stream key, nonce(0, last?), plaintext[0:S]) ‖ tag
    ...           segment i, every non-final one carrying exactly S plaintext bytes
    ...     ≤S+16 the final segment: 0..S plaintext bytes (empty only if it is segment 0)

    stream key = HKDF-SHA256(ikm = DEK, salt = salt, info = header ‖ associated data, L = 32)
    nonce(i, last) = nonce prefix (7) ‖ i (uint32) ‖ 0x01 if last else 0x00

Each segment's nonce binds its position and whether it ends the stream, so a reordered,
dropped, duplicated or truncated segment, or bytes after the final one, fail authentication.
A fresh salt gives every stream its own key, so the per-key limit on random GCM nonces does not
apply across streams. A segment's plaintext is released only after its tag verified; a failure
is raised after the verified segments before it were written (see docs/keyset-format.md).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kustody.client.aead import FORMAT_STREAM, HEADER_BYTES, KEY_BYTES, TAG_BYTES, peek
from kustody.client.aead_errors import DecryptionFailed, MalformedCiphertext

SALT_BYTES = 16
NONCE_PREFIX_BYTES = 7
STREAM_HEADER_BYTES = HEADER_BYTES + 4 + SALT_BYTES + NONCE_PREFIX_BYTES  # 32
DEFAULT_SEGMENT_SIZE = 1024 * 1024
MIN_SEGMENT_SIZE = 4 * 1024
# A decryption limit as much as an encryption one: the segment size comes from the (not yet
# authenticated) header, and the reader holds about three segments in memory.
MAX_SEGMENT_SIZE = 64 * 1024 * 1024
MAX_SEGMENTS = 2**32  # the segment counter is 4 bytes

_STREAM_HEADER = struct.Struct(">BII16s7s")


def check_segment_size(segment_size: int) -> None:
    if type(segment_size) is not int or not MIN_SEGMENT_SIZE <= segment_size <= MAX_SEGMENT_SIZE:
        raise ValueError(
            f"segment_size must be an int from {MIN_SEGMENT_SIZE} to {MAX_SEGMENT_SIZE} bytes"
        )


def stream_key(dek: bytes, head: bytes, associated_data: bytes) -> bytes:
    """HKDF-SHA256 of the DEK with the stream's salt; info binds the whole header and the AD."""
    salt = head[HEADER_BYTES + 4 : HEADER_BYTES + 4 + SALT_BYTES]
    hkdf = HKDF(algorithm=SHA256(), length=KEY_BYTES, salt=salt, info=head + associated_data)
    return hkdf.derive(dek)


def _nonce(prefix: bytes, index: int, last: bool) -> bytes:
    return prefix + struct.pack(">IB", index, 1 if last else 0)


class Sealer:
    """Encrypts one stream segment by segment. ``seal(plaintext, last)`` must be given every
    non-final segment with exactly ``segment_size`` bytes and ends with one ``last=True``.
    Until then the output is an unterminated stream that no reader accepts."""

    def __init__(
        self,
        dek: bytes,
        key_id: int,
        associated_data: bytes,
        segment_size: int,
        *,
        _salt: bytes | None = None,
        _nonce_prefix: bytes | None = None,
    ) -> None:
        check_segment_size(segment_size)
        salt = os.urandom(SALT_BYTES) if _salt is None else _salt
        prefix = os.urandom(NONCE_PREFIX_BYTES) if _nonce_prefix is None else _nonce_prefix
        if len(salt) != SALT_BYTES or len(prefix) != NONCE_PREFIX_BYTES:
            raise ValueError("salt must be 16 bytes and nonce prefix 7")  # private seam only
        self.header = _STREAM_HEADER.pack(FORMAT_STREAM, key_id, segment_size, salt, prefix)
        self.segment_size = segment_size
        self._aead = AESGCM(stream_key(dek, self.header, associated_data))
        self._prefix = prefix
        self._index = 0
        self._done = False

    def seal(self, plaintext: bytes, last: bool) -> bytes:
        if self._done:
            raise ValueError("the stream already has its final segment")
        if len(plaintext) > self.segment_size or (not last and len(plaintext) < self.segment_size):
            raise ValueError("a non-final segment must hold exactly segment_size bytes")
        if last and self._index > 0 and not plaintext:
            raise ValueError("only a stream's first segment may be an empty final segment")
        if self._index >= MAX_SEGMENTS:
            raise ValueError(f"a stream holds at most {MAX_SEGMENTS} segments")
        segment = self._aead.encrypt(_nonce(self._prefix, self._index, last), plaintext, None)
        self._index += 1
        self._done = last
        return segment


def read_exactly(src: BinaryIO, size: int) -> bytes:
    """``size`` bytes, or fewer only at end of file (``read`` may return short counts)."""
    chunk = src.read(size)
    if chunk is None:
        raise ValueError("src is a non-blocking stream with no data ready; pass a blocking one")
    if len(chunk) == size or not chunk:
        return bytes(chunk)
    parts = [chunk]
    have = len(chunk)
    while have < size:
        more = src.read(size - have)
        if more is None:
            raise ValueError("src is a non-blocking stream with no data ready")
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def write_all(dst: BinaryIO, data: bytes) -> None:
    """Write every byte: an unbuffered (raw) file may take fewer than it was given."""
    written = dst.write(data)
    if written is None or written >= len(data):  # None: a writer that does not count
        return
    view = memoryview(data)[written:]
    while view:
        written = dst.write(view)
        if not written:
            raise OSError("dst accepted no bytes (a non-blocking file?); pass a blocking one")
        view = view[written:]


def encrypt(sealer: Sealer, src: BinaryIO, dst: BinaryIO) -> None:
    """Write the header and every segment of ``src``. Reads one segment ahead, so the final
    segment is known before it is sealed and is empty only for an empty plaintext."""
    write_all(dst, sealer.header)
    segment_size = sealer.segment_size
    current = read_exactly(src, segment_size)
    while True:
        following = read_exactly(src, segment_size) if len(current) == segment_size else b""
        last = not following
        write_all(dst, sealer.seal(current, last))
        if last:
            return
        current = following


class Opened:
    """A stream whose header was read: its key id and segment size, and (after the caller
    found the key) an iterator over verified segment plaintexts."""

    def __init__(self, head: bytes) -> None:
        _, self.key_id, self.segment_size, _, self._prefix = _STREAM_HEADER.unpack(head)
        self.header = head

    def segments(
        self, dek: bytes, src: BinaryIO, associated_data: bytes
    ) -> Iterator[tuple[bytes, bool]]:
        """Yield ``(plaintext, last)`` for each segment once its tag verified. Raises
        :class:`DecryptionFailed` at the first segment that does not verify, including a
        stream that ends without its final segment or continues after it."""
        aead = AESGCM(stream_key(dek, self.header, associated_data))
        full = self.segment_size + TAG_BYTES
        current = read_exactly(src, full)
        index = 0
        while True:
            following = read_exactly(src, full) if len(current) == full else b""
            last = not following
            if len(current) < TAG_BYTES:
                raise DecryptionFailed(
                    f"the stream is truncated: segment {index} is missing or cut short"
                )
            try:
                plaintext = aead.decrypt(_nonce(self._prefix, index, last), current, None)
            except InvalidTag:
                raise DecryptionFailed(
                    f"segment {index} of the stream failed authentication: the stream was "
                    "changed, truncated, reordered or extended, or the associated data differs "
                    "from the one it was encrypted with; discard any output already written"
                ) from None
            if last and index > 0 and not plaintext:
                raise MalformedCiphertext(
                    "the stream ends with an empty segment after other segments, which no "
                    "conforming writer produces"
                )
            yield plaintext, last
            if last:
                return
            index += 1
            if index >= MAX_SEGMENTS:
                raise DecryptionFailed(f"the stream has more than {MAX_SEGMENTS} segments")
            current = following


def open_stream(src: BinaryIO) -> Opened:
    """Read and check a stream header (shape only; the key and tags are checked later)."""
    head = read_exactly(src, STREAM_HEADER_BYTES)
    fmt, _ = peek(head)
    if fmt != FORMAT_STREAM:
        raise MalformedCiphertext(
            "this is a one-shot ciphertext (format 0x01); use decrypt, not decrypt_stream"
        )
    if len(head) < STREAM_HEADER_BYTES:
        raise MalformedCiphertext(
            f"the stream is {len(head)} bytes, shorter than its {STREAM_HEADER_BYTES}-byte header"
        )
    opened = Opened(head)
    try:
        check_segment_size(opened.segment_size)
    except ValueError:
        raise MalformedCiphertext(
            f"the stream header gives a segment size of {opened.segment_size} bytes, outside "
            f"{MIN_SEGMENT_SIZE}..{MAX_SEGMENT_SIZE}"
        ) from None
    return opened
