"""kustody.client keyset streams (format 0x02): round trip in constant memory, and every way a
stream can be damaged is a typed error after which only verified plaintext was written."""

from __future__ import annotations

import base64
import io
import json
import os
import struct
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kustody.client import (
    DecryptionFailed,
    Keyset,
    KeysetError,
    MalformedCiphertext,
    UnknownKeyId,
)
from kustody.client.aead_stream import stream_key

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
S = 4096  # the smallest segment size, so that several segments stay small
HEADER = 32
GEN1, GEN2 = os.urandom(32), os.urandom(32)
ID1, ID2 = 0x0BADCAFE, 0x00C0FFEE


def keyset(*keys: tuple[int, int, bytes, bool]) -> Keyset:
    primary = next(key_id for key_id, _, _, is_primary in keys if is_primary)
    doc: dict[str, Any] = {
        "format": "kustody.io/keyset/v1",
        "dataKey": {"namespace": "media", "name": "uploads"},
        "primaryKeyId": primary,
        "keys": [
            {
                "keyId": key_id,
                "generation": generation,
                "status": "Primary" if is_primary else "DecryptOnly",
                "key": base64.b64encode(dek).decode(),
            }
            for key_id, generation, dek, is_primary in keys
        ],
    }
    return Keyset.from_json(json.dumps(doc))


ONLY_GEN1 = keyset((ID1, 1, GEN1, True))
GEN2_PRIMARY = keyset((ID1, 1, GEN1, False), (ID2, 2, GEN2, True))
GEN1_REMOVED = keyset((ID2, 2, GEN2, True))


class Trickle(io.RawIOBase):
    """A source that returns at most ``step`` bytes per read, like a pipe or a socket."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(self._step, len(buffer), len(self._data))
        buffer[:n] = self._data[:n]
        self._data = self._data[n:]
        return n


def encrypt(ks: Keyset, plaintext: bytes, ad: bytes = b"", segment_size: int = S) -> bytes:
    out = io.BytesIO()
    ks.encrypt_stream(io.BytesIO(plaintext), out, ad, segment_size=segment_size)
    return out.getvalue()


def decrypt(ks: Keyset, ciphertext: bytes, ad: bytes = b"") -> bytes:
    out = io.BytesIO()
    ks.decrypt_stream(io.BytesIO(ciphertext), out, ad)
    return out.getvalue()


def segments(ciphertext: bytes, segment_size: int = S) -> list[bytes]:
    body = ciphertext[HEADER:]
    step = segment_size + 16
    return [body[i : i + step] for i in range(0, len(body), step)]


SIZES = st.one_of(
    st.sampled_from([0, 1, S - 1, S, S + 1, 2 * S, 3 * S + 17]), st.integers(0, 5 * S)
)


@FEW
@given(size=SIZES, ad=st.binary(max_size=40), step=st.sampled_from([1000, 4096, 10_000]))
def test_round_trip(size: int, ad: bytes, step: int) -> None:
    plaintext = os.urandom(size)
    out = io.BytesIO()
    GEN2_PRIMARY.encrypt_stream(Trickle(plaintext, step), out, ad, segment_size=S)  # type: ignore[arg-type]
    ciphertext = out.getvalue()
    clear = io.BytesIO()
    GEN2_PRIMARY.decrypt_stream(Trickle(ciphertext, step), clear, ad)  # type: ignore[arg-type]
    assert clear.getvalue() == plaintext


@pytest.mark.parametrize("size", [0, 1, S, S + 1, 3 * S])
def test_layout(size: int) -> None:
    ciphertext = encrypt(GEN2_PRIMARY, bytes(size), segment_size=S)
    fmt, key_id, segment_size = struct.unpack(">BII", ciphertext[:9])
    assert (fmt, key_id, segment_size) == (0x02, ID2, S)
    count = max(1, -(-size // S))
    assert len(segments(ciphertext)) == count
    assert len(ciphertext) == HEADER + size + 16 * count
    other = encrypt(GEN2_PRIMARY, bytes(size), segment_size=S)
    assert other[9:32] != ciphertext[9:32]  # fresh salt and nonce prefix per stream


def test_default_segment_size_is_1_mib() -> None:
    ciphertext = encrypt(GEN2_PRIMARY, bytes(10), segment_size=1024 * 1024)
    out = io.BytesIO()
    GEN2_PRIMARY.encrypt_stream(io.BytesIO(bytes(10)), out)
    assert out.getvalue()[5:9] == ciphertext[5:9] == (1024 * 1024).to_bytes(4, "big")


@pytest.mark.parametrize("segment_size", [0, 4095, 64 * 1024 * 1024 + 1, -1])
def test_segment_size_is_bounded(segment_size: int) -> None:
    with pytest.raises(ValueError, match="segment_size"):
        encrypt(GEN2_PRIMARY, b"x", segment_size=segment_size)


def test_the_stream_key_is_hkdf_of_the_dek_with_salt_and_header_and_ad() -> None:
    ciphertext = encrypt(GEN2_PRIMARY, b"abc", b"ad")
    head = ciphertext[:HEADER]
    key = stream_key(GEN2, head, b"ad")
    nonce = head[25:32] + (0).to_bytes(4, "big") + b"\x01"
    assert AESGCM(key).decrypt(nonce, ciphertext[HEADER:], None) == b"abc"


def mutate(ciphertext: bytes, data: st.DataObject) -> bytes:
    """One kind of damage, drawn by hypothesis."""
    parts = segments(ciphertext)
    kind = data.draw(
        st.sampled_from(["truncate", "flip", "drop", "duplicate", "swap", "extend", "splice"])
    )
    if kind == "truncate":
        return ciphertext[: data.draw(st.integers(0, len(ciphertext) - 1))]
    if kind == "flip":
        damaged = bytearray(ciphertext)
        damaged[data.draw(st.integers(0, len(damaged) - 1))] ^= 1 << data.draw(st.integers(0, 7))
        return bytes(damaged)
    if kind == "extend":
        return ciphertext + data.draw(st.binary(min_size=1, max_size=S + 40))
    if kind == "splice":  # a segment from another stream under the same key
        other = segments(encrypt(GEN2_PRIMARY, os.urandom(len(parts) * S)))
        i = data.draw(st.integers(0, len(parts) - 1))
        parts[i] = other[i]
        return ciphertext[:HEADER] + b"".join(parts)
    if len(parts) < 2 and kind in ("swap", "drop"):
        kind = "duplicate"
    i = data.draw(st.integers(0, len(parts) - 1))
    if kind == "drop":
        del parts[i]
    elif kind == "duplicate":
        parts.insert(i, parts[i])
    else:
        j = data.draw(st.integers(0, len(parts) - 1).filter(lambda j: j != i))
        parts[i], parts[j] = parts[j], parts[i]
    return ciphertext[:HEADER] + b"".join(parts)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=SIZES, data=st.data())
def test_any_damage_is_an_error_and_only_verified_plaintext_is_written(
    size: int, data: st.DataObject
) -> None:
    plaintext = os.urandom(size)
    ciphertext = encrypt(GEN2_PRIMARY, plaintext, b"ad")
    damaged = mutate(ciphertext, data)
    if damaged == ciphertext:
        return
    out = io.BytesIO()
    with pytest.raises(KeysetError):
        GEN2_PRIMARY.decrypt_stream(io.BytesIO(damaged), out, b"ad")
    assert plaintext.startswith(out.getvalue())


@FEW
@given(size=SIZES, right=st.binary(max_size=16), wrong=st.binary(max_size=16))
def test_wrong_associated_data_is_an_error_before_any_output(
    size: int, right: bytes, wrong: bytes
) -> None:
    if right == wrong:
        return
    ciphertext = encrypt(GEN2_PRIMARY, os.urandom(size), right)
    out = io.BytesIO()
    with pytest.raises(DecryptionFailed, match="segment 0"):
        GEN2_PRIMARY.decrypt_stream(io.BytesIO(ciphertext), out, wrong)
    assert out.getvalue() == b""


def test_truncation_at_a_segment_boundary_names_the_failing_segment() -> None:
    ciphertext = encrypt(GEN2_PRIMARY, os.urandom(3 * S))
    out = io.BytesIO()
    with pytest.raises(DecryptionFailed, match="segment 1 "):
        GEN2_PRIMARY.decrypt_stream(io.BytesIO(ciphertext[: HEADER + 2 * (S + 16)]), out)
    assert len(out.getvalue()) == S  # segment 0 verified and written; the caller discards it
    with pytest.raises(DecryptionFailed, match="truncated"):
        decrypt(GEN2_PRIMARY, ciphertext[:HEADER])


def test_a_removed_generation_gives_an_error_naming_its_key_id() -> None:
    ciphertext = encrypt(ONLY_GEN1, b"old upload")
    assert decrypt(GEN2_PRIMARY, ciphertext) == b"old upload"
    out = io.BytesIO()
    with pytest.raises(UnknownKeyId, match="0x0badcafe") as caught:
        GEN1_REMOVED.decrypt_stream(io.BytesIO(ciphertext), out)
    assert caught.value.key_id == ID1
    assert "removed" in str(caught.value)
    assert out.getvalue() == b""


@pytest.mark.parametrize(
    ("ciphertext", "match"),
    [
        (b"", "shorter than its 5-byte header"),
        (b"\x02\x00", "shorter than its 5-byte header"),
        (b"\x02" + ID2.to_bytes(4, "big") + bytes(10), "shorter than its 32-byte header"),
        (b"\x01" + ID2.to_bytes(4, "big") + bytes(60), "one-shot"),
        (b"\x07" + bytes(60), "format byte 0x07"),
        (b"\x02" + ID2.to_bytes(4, "big") + (4095).to_bytes(4, "big") + bytes(60), "4095"),
        (b"\x02" + ID2.to_bytes(4, "big") + (2**32 - 1).to_bytes(4, "big") + bytes(60), "size"),
    ],
)
def test_malformed_streams_are_typed_errors(ciphertext: bytes, match: str) -> None:
    with pytest.raises(MalformedCiphertext, match=match):
        decrypt(GEN2_PRIMARY, ciphertext)


def test_an_empty_final_segment_after_others_is_refused() -> None:
    """Readers accept only what a conforming writer produces: the final segment is empty only
    when the whole plaintext is empty."""
    ciphertext = encrypt(GEN2_PRIMARY, os.urandom(S))
    head = ciphertext[:HEADER]
    aes = AESGCM(stream_key(GEN2, head, b""))
    plaintext = decrypt(GEN2_PRIMARY, ciphertext)
    prefix = head[25:32]
    forged = (
        head
        + aes.encrypt(prefix + (0).to_bytes(4, "big") + b"\x00", plaintext, None)
        + aes.encrypt(prefix + (1).to_bytes(4, "big") + b"\x01", b"", None)
    )
    with pytest.raises(MalformedCiphertext, match="empty segment"):
        decrypt(GEN2_PRIMARY, forged)


def test_one_shot_ciphertexts_and_streams_do_not_mix() -> None:
    with pytest.raises(MalformedCiphertext, match="decrypt_stream"):
        GEN2_PRIMARY.decrypt(encrypt(GEN2_PRIMARY, b"x"))
    with pytest.raises(MalformedCiphertext, match="use decrypt"):
        decrypt(GEN2_PRIMARY, GEN2_PRIMARY.encrypt(b"x" * 100))


def test_reencrypt_stream_moves_to_the_primary() -> None:
    plaintext = os.urandom(2 * S + 5)
    old = encrypt(ONLY_GEN1, plaintext, b"ad")
    out = io.BytesIO()
    GEN2_PRIMARY.reencrypt_stream(io.BytesIO(old), out, b"ad")
    new = out.getvalue()
    assert new[1:5] == ID2.to_bytes(4, "big")
    assert new[5:9] == old[5:9]  # the segment size is kept
    assert decrypt(GEN1_REMOVED, new, b"ad") == plaintext
    with pytest.raises(UnknownKeyId):
        decrypt(GEN1_REMOVED, old, b"ad")


@FEW
@given(size=st.integers(0, 4 * S), data=st.data())
def test_reencrypt_stream_never_turns_a_damaged_stream_into_a_valid_one(
    size: int, data: st.DataObject
) -> None:
    plaintext = os.urandom(size)
    old = encrypt(ONLY_GEN1, plaintext)
    damaged = mutate(old, data)
    if damaged == old:
        return
    out = io.BytesIO()
    with pytest.raises(KeysetError):
        GEN2_PRIMARY.reencrypt_stream(io.BytesIO(damaged), out)
    partial = out.getvalue()
    if len(partial) >= HEADER:  # the output has no final segment: no reader accepts it
        clear = io.BytesIO()
        with pytest.raises(DecryptionFailed):
            GEN2_PRIMARY.decrypt_stream(io.BytesIO(partial), clear)
        assert plaintext.startswith(clear.getvalue())


def test_constant_memory_reads_one_segment_ahead() -> None:
    """The reader never asks the source for more than a segment (plus tag) at a time."""

    class Counting(io.BytesIO):
        largest = 0

        def read(self, size: int | None = -1) -> bytes:
            assert size is not None
            assert 0 < size <= S + 16
            Counting.largest = max(Counting.largest, size)
            return super().read(size)

    ciphertext = encrypt(GEN2_PRIMARY, os.urandom(20 * S))
    out = io.BytesIO()
    GEN2_PRIMARY.decrypt_stream(Counting(ciphertext), out)
    assert Counting.largest == S + 16


class Stingy(io.RawIOBase):
    """A sink that takes at most 1000 bytes per write, like an unbuffered pipe."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        taken = bytes(data[:1000])
        self.data += taken
        return len(taken)


def test_short_writes_are_completed() -> None:
    plaintext = os.urandom(2 * S + 3)
    sink = Stingy()
    GEN2_PRIMARY.encrypt_stream(io.BytesIO(plaintext), sink, segment_size=S)  # type: ignore[arg-type]
    clear = Stingy()
    GEN2_PRIMARY.decrypt_stream(io.BytesIO(bytes(sink.data)), clear)  # type: ignore[arg-type]
    assert bytes(clear.data) == plaintext
    again = Stingy()
    GEN2_PRIMARY.reencrypt_stream(io.BytesIO(bytes(sink.data)), again)  # type: ignore[arg-type]
    assert decrypt(GEN2_PRIMARY, bytes(again.data)) == plaintext
