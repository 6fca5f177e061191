"""Generate the keyset test vectors, tests/vectors/keyset_v1.json (docs/keyset-format.md).

    python tools/gen_keyset_vectors.py          # (re)write the file
    python tools/gen_keyset_vectors.py --check  # exit 1 if it differs from what this generates

Keys, nonces, salts and nonce prefixes are fixed (derived from labels with SHA-256) and handed
to the library's private seams, ``kustody.client.aead._seal`` and
``kustody.client.aead_stream.Sealer(_salt=, _nonce_prefix=)``; the public API always draws them
from ``os.urandom``. Invalid streams that no conforming writer can produce (an empty final
segment after others, the last flag on an inner segment) are built here from the primitives.
The vectors were generated once; the tests check the library *and* an independent
implementation written from the document against them, so the two cannot drift together.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.client import aead, aead_stream
from kustody.client.aead_stream import Sealer, stream_key
from kustody.client.keyset import FORMAT

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "vectors" / "keyset_v1.json"
SEGMENT = 4096


def _derive(label: str, size: int) -> bytes:
    return hashlib.sha256(f"kustody.io/keyset/v1 test vector: {label}".encode()).digest()[:size]


def _pattern(size: int) -> bytes:
    return bytes((i * 31 + 7) % 251 for i in range(size))


# (key id, generation, status); gen 3 is the primary. 0x9c04d7b2 has the high bit set.
KEYS = [(0x2E5F01A3, 1, "DecryptOnly"), (0x9C04D7B2, 2, "DecryptOnly"), (0x0000A1B2, 3, "Primary")]
DEKS = {key_id: _derive(f"key {generation}", 32) for key_id, generation, _ in KEYS}
PRIMARY = KEYS[2][0]
UNKNOWN_KEY_ID = 0x00000000


def keyset_document() -> dict[str, Any]:
    return {
        "format": FORMAT,
        "dataKey": {"namespace": "shop", "name": "orders"},
        "primaryKeyId": PRIMARY,
        "keys": [
            {
                "keyId": key_id,
                "generation": generation,
                "status": status,
                "key": base64.b64encode(DEKS[key_id]).decode(),
            }
            for key_id, generation, status in KEYS
        ],
    }


def _one_shot(name: str, key_id: int, plaintext: bytes, ad: bytes) -> dict[str, Any]:
    nonce = _derive(f"nonce {name}", 12)
    ciphertext = aead._seal(
        aead.new_aead(DEKS[key_id]), aead.header(aead.FORMAT_ONE_SHOT, key_id), plaintext, ad, nonce
    )
    return {
        "name": name,
        "keyId": key_id,
        "associatedData": ad.hex(),
        "plaintext": plaintext.hex(),
        "nonce": nonce.hex(),
        "ciphertext": ciphertext.hex(),
    }


def _stream(name: str, key_id: int, plaintext: bytes, ad: bytes) -> dict[str, Any]:
    salt, prefix = _derive(f"salt {name}", 16), _derive(f"nonce prefix {name}", 7)
    sealer = Sealer(DEKS[key_id], key_id, ad, SEGMENT, _salt=salt, _nonce_prefix=prefix)
    out = io.BytesIO()
    aead_stream.encrypt(sealer, io.BytesIO(plaintext), out)
    return {
        "name": name,
        "keyId": key_id,
        "segmentSize": SEGMENT,
        "associatedData": ad.hex(),
        "plaintext": plaintext.hex(),
        "salt": salt.hex(),
        "noncePrefix": prefix.hex(),
        "streamKey": stream_key(DEKS[key_id], sealer.header, ad).hex(),
        "ciphertext": out.getvalue().hex(),
    }


def _invalid(name: str, kind: str, ciphertext: bytes, ad: bytes, error: str) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "associatedData": ad.hex(),
        "ciphertext": ciphertext.hex(),
        "error": error,
    }


def _forged_stream(name: str, segments: list[tuple[bytes, int, bool]]) -> bytes:
    """A stream under the primary whose segments are (plaintext, index, last) as given."""
    salt, prefix = _derive(f"salt {name}", 16), _derive(f"nonce prefix {name}", 7)
    head = struct.pack(">BII", 0x02, PRIMARY, SEGMENT) + salt + prefix
    gcm = AESGCM(stream_key(DEKS[PRIMARY], head, b""))
    body = b"".join(
        gcm.encrypt(prefix + struct.pack(">IB", index, last), plaintext, None)
        for plaintext, index, last in segments
    )
    return head + body


def _flip(data: bytes, position: int) -> bytes:
    changed = bytearray(data)
    changed[position] ^= 0x01
    return bytes(changed)


def render() -> str:
    ad = b"orders/17"
    one_shot = [
        _one_shot("empty plaintext, no associated data", PRIMARY, b"", b""),
        _one_shot("short, with associated data", PRIMARY, b"hello, kustody", ad),
        _one_shot("1000 bytes, with associated data", PRIMARY, _pattern(1000), ad),
        _one_shot("under decrypt-only generation 1", KEYS[0][0], b"written before", b""),
        _one_shot("key id with the high bit set", KEYS[1][0], b"generation 2", ad),
    ]
    streaming = [
        _stream("empty plaintext: one empty final segment", PRIMARY, b"", b""),
        _stream("one short segment, with associated data", PRIMARY, _pattern(100), ad),
        _stream("exactly one full segment", PRIMARY, _pattern(SEGMENT), b""),
        _stream("three segments, with associated data", PRIMARY, _pattern(2 * SEGMENT + 1000), ad),
        _stream("two segments under generation 2", KEYS[1][0], _pattern(SEGMENT + 1), b""),
    ]
    short = bytes.fromhex(one_shot[1]["ciphertext"])
    small = bytes.fromhex(streaming[1]["ciphertext"])  # one segment, with associated data
    two = bytes.fromhex(streaming[4]["ciphertext"])  # two segments, no associated data
    three = bytes.fromhex(streaming[3]["ciphertext"])  # three segments, with associated data
    full = SEGMENT + 16
    s0, s1 = two[32 : 32 + full], two[32 + full :]
    other = KEYS[0][0]
    cases: list[tuple[str, str, bytes, bytes, str]] = [
        ("tag changed", "oneShot", _flip(short, len(short) - 1), ad, "DECRYPTION_FAILED"),
        ("ciphertext changed", "oneShot", _flip(short, 20), ad, "DECRYPTION_FAILED"),
        ("nonce changed", "oneShot", _flip(short, 6), ad, "DECRYPTION_FAILED"),
        ("wrong associated data", "oneShot", short, b"orders/18", "DECRYPTION_FAILED"),
        ("associated data missing", "oneShot", short, b"", "DECRYPTION_FAILED"),
        (
            "key id changed to another key of the keyset",
            "oneShot",
            short[:1] + struct.pack(">I", other) + short[5:],
            ad,
            "DECRYPTION_FAILED",
        ),
        (
            "key id not in the keyset (a removed generation)",
            "oneShot",
            short[:1] + struct.pack(">I", UNKNOWN_KEY_ID) + short[5:],
            ad,
            "KEY_ID_UNKNOWN",
        ),
        ("truncated to 32 bytes", "oneShot", short[:32], ad, "CIPHERTEXT_MALFORMED"),
        ("last byte of the tag missing", "oneShot", short[:-1], ad, "DECRYPTION_FAILED"),
        ("byte appended", "oneShot", short + b"\x00", ad, "DECRYPTION_FAILED"),
        ("unknown format byte 0x03", "oneShot", b"\x03" + short[1:], ad, "CIPHERTEXT_MALFORMED"),
        ("a stream given to the one-shot API", "oneShot", small, ad, "CIPHERTEXT_MALFORMED"),
        ("final segment dropped", "stream", two[:32] + s0, b"", "DECRYPTION_FAILED"),
        ("first segment dropped", "stream", two[:32] + s1, b"", "DECRYPTION_FAILED"),
        (
            "middle segment dropped",
            "stream",
            three[: 32 + full] + three[32 + 2 * full :],
            ad,
            "DECRYPTION_FAILED",
        ),
        ("segments swapped", "stream", two[:32] + s1 + s0, b"", "DECRYPTION_FAILED"),
        ("segment 0 duplicated", "stream", two[:32] + s0 + s0 + s1, b"", "DECRYPTION_FAILED"),
        ("byte after the final segment", "stream", two + b"\x00", b"", "DECRYPTION_FAILED"),
        ("final segment cut short", "stream", two[:-1], b"", "DECRYPTION_FAILED"),
        ("bit flipped in segment 1", "stream", _flip(two, 32 + full + 5), b"", "DECRYPTION_FAILED"),
        ("header only", "stream", small[:32], ad, "DECRYPTION_FAILED"),
        ("header truncated to 31 bytes", "stream", small[:31], ad, "CIPHERTEXT_MALFORMED"),
        ("wrong associated data", "stream", small, b"orders/18", "DECRYPTION_FAILED"),
        ("salt changed", "stream", _flip(small, 9), ad, "DECRYPTION_FAILED"),
        ("nonce prefix changed", "stream", _flip(small, 31), ad, "DECRYPTION_FAILED"),
        (
            "segment size changed to 8192",
            "stream",
            two[:5] + struct.pack(">I", 2 * SEGMENT) + two[9:],
            b"",
            "DECRYPTION_FAILED",
        ),
        (
            "segment size below 4096",
            "stream",
            small[:5] + struct.pack(">I", 4095) + small[9:],
            ad,
            "CIPHERTEXT_MALFORMED",
        ),
        (
            "key id not in the keyset (a removed generation)",
            "stream",
            small[:1] + struct.pack(">I", UNKNOWN_KEY_ID) + small[5:],
            ad,
            "KEY_ID_UNKNOWN",
        ),
        (
            "a one-shot ciphertext given to the stream API",
            "stream",
            short,
            ad,
            "CIPHERTEXT_MALFORMED",
        ),
        (
            "last flag on segment 0 of two",
            "stream",
            _forged_stream("last flag early", [(_pattern(SEGMENT), 0, True), (b"x", 1, True)]),
            b"",
            "DECRYPTION_FAILED",
        ),
        (
            "empty final segment after a full one (no conforming writer makes it)",
            "stream",
            _forged_stream("empty final", [(_pattern(SEGMENT), 0, False), (b"", 1, True)]),
            b"",
            "CIPHERTEXT_MALFORMED",
        ),
    ]
    invalid = [
        _invalid(f"{'one-shot' if kind == 'oneShot' else 'stream'}: {name}", kind, ct, data, error)
        for name, kind, ct, data, error in cases
    ]
    valid = keyset_document()
    two_primaries = json.loads(json.dumps(valid))
    two_primaries["keys"][0]["status"] = "Primary"
    short_key = json.loads(json.dumps(valid))
    short_key["keys"][0]["key"] = base64.b64encode(DEKS[KEYS[0][0]][:16]).decode()
    unknown_field = json.loads(json.dumps(valid))
    unknown_field["keys"][1]["createdAt"] = "2026-01-01T00:00:00Z"
    mismatch = json.loads(json.dumps(valid))
    mismatch["primaryKeyId"] = KEYS[0][0]
    invalid_keysets = [
        {"name": "two Primary keys", "document": json.dumps(two_primaries)},
        {"name": "a 16-byte key", "document": json.dumps(short_key)},
        {"name": "an unknown field", "document": json.dumps(unknown_field)},
        {"name": "primaryKeyId names a DecryptOnly key", "document": json.dumps(mismatch)},
        {
            "name": "a repeated JSON field",
            "document": json.dumps(valid).replace('"format"', '"format": "x", "format"', 1),
        },
        {
            "name": "another format",
            "document": json.dumps({**valid, "format": "kustody.io/keyset/v2"}),
        },
    ]
    for entry in invalid_keysets:
        entry["error"] = "KEYSET_INVALID"
    vectors = {
        "format": "kustody.io/keyset-vectors/v1",
        "description": (
            "Test vectors for the kustody.io/keyset/v1 keyset file and the one-shot (0x01) and "
            "streaming (0x02) ciphertext formats, see docs/keyset-format.md. All byte strings "
            "are lowercase hex. Generated by tools/gen_keyset_vectors.py."
        ),
        "keyset": valid,
        "oneShot": one_shot,
        "streaming": streaming,
        "invalid": invalid,
        "invalidKeysets": invalid_keysets,
    }
    return json.dumps(vectors, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} differs from tools/gen_keyset_vectors.py's output")
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
