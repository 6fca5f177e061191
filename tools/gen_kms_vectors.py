"""Generate the KMS v2 envelope vectors, tests/vectors/kms_envelope_v1.json.

    python tools/gen_kms_vectors.py          # (re)write the file
    python tools/gen_kms_vectors.py --check  # exit 1 if it differs from what this generates

The Python sidecar's KMS plugin and the Go one (kms/, `kustody-kms`) must write and read the
same bytes: a Secret sealed by one opens in the other. These vectors come from the Python
implementation (``kustody.domain.envelope``, ``kustody.domain.aad``, ``keyversion``); the Go
tests (kms/envelope_test.go) check the Go implementation against them, and
tests/unit/test_kms_vectors.py checks that the file is what this generator writes, so a change
on either side that the other does not follow fails a test.

Keys and nonces are fixed (derived from labels with SHA-256) and the AES-256-GCM seal is done
in software here; in the token the same seal happens under a KEK that never leaves it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.domain.aad import KmsBinding, associated_data
from kustody.domain.envelope import MAX_BINARY_BYTES, Envelope, header_for
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import KeyVersionRef, parse_label, validate_key_ring

ROOT = Path(__file__).resolve().parents[1]
TARGET = ROOT / "tests" / "vectors" / "kms_envelope_v1.json"


def _derive(label: str, size: int) -> bytes:
    return hashlib.sha256(f"kustody.io/kms/v1 test vector: {label}".encode()).digest()[:size]


def _seal(ring: str, version: int, fingerprint: str, plaintext: bytes) -> dict[str, Any]:
    ref = KeyVersionRef(ring, version)
    key_id = ref.kms_key_id(fingerprint)
    key = _derive(f"key {ring} {version}", 32)
    nonce = _derive(f"nonce {ring} {version} {len(plaintext)}", 12)
    aad = associated_data(header_for(ref), KmsBinding(key_id))
    envelope = Envelope(ref, nonce, AESGCM(key).encrypt(nonce, plaintext, aad))
    return {
        "ring": ring,
        "version": version,
        "fingerprint": fingerprint,
        "key_id": key_id,
        "label": ref.label,
        "object_id": ref.object_id.hex(),
        "key": key.hex(),
        "nonce": nonce.hex(),
        "plaintext": plaintext.hex(),
        "aad": aad.hex(),
        "envelope": envelope.to_bytes().hex(),
    }


def _error(raw: bytes) -> str:
    try:
        Envelope.from_bytes(raw)
    except DomainError as exc:
        return str(exc)
    raise AssertionError("expected a malformed envelope")


def _malformed() -> list[dict[str, str]]:
    good = bytes.fromhex(_seal("secrets", 1, "a1b2c3", b"\x01" * 32)["envelope"])
    ring = b"secrets"
    head = b"KSTY\x01" + bytes([len(ring)]) + ring
    cases = {
        "too long": b"KSTY\x01" + b"\x00" * MAX_BINARY_BYTES,
        "short": b"KST",
        "bad magic": b"XSTY" + good[4:],
        "format version 2": b"KSTY\x02" + good[5:],
        "empty KeyRing name": b"KSTY\x01\x00" + good[6:],
        "truncated": good[: 6 + len(ring) + 4 + 12 + 16],
        "KeyRing not DNS-1123": b"KSTY\x01\x07Secrets" + good[13:],
        "KeyRing not ASCII": b"KSTY\x01\x07secr\xc3\xa9t" + good[13:],
        "version 0": head + struct.pack(">I", 0) + good[17:],
        "ciphertext too long": b"KSTY\x01\x01s" + struct.pack(">I", 1) + b"\x00" * (12 + 4113),
    }
    return [{"name": name, "raw": raw.hex(), "error": _error(raw)} for name, raw in cases.items()]


def _labels() -> list[dict[str, Any]]:
    labels = [
        "kustody:secrets:v1",
        "kustody:cluster.secrets-2:v4294967295",
        "kustody:secrets:v4294967296",
        "kustody:secrets:v0",
        "kustody:secrets:v01",
        "kustody:Secrets:v1",
        "kustody:-secrets:v1",
        "kustody:secrets:1",
        "kustody::v1",
        "other:secrets:v1",
    ]
    out: list[dict[str, Any]] = []
    for label in labels:
        ref = parse_label(label)
        out.append(
            {
                "label": label,
                "ring": ref.key_ring if ref else None,
                "version": ref.version if ref else None,
            }
        )
    return out


def _key_rings() -> list[dict[str, Any]]:
    """KeyRing names and whether the Python side accepts them (a DNS-1123 subdomain)."""
    names = [
        "a", "secrets", "cluster.secrets-2", "a-b.c-d", "0", "9a", "a" * 253, "a" * 254, "",
        "A", "-a", "a-", "a.", ".a", "a..b", "a.-b", "a-.b", "a_b", "a b", "é", "a/b",
        "x" * 63 + "." + "y" * 63,
    ]  # fmt: skip
    out: list[dict[str, Any]] = []
    for name in names:
        try:
            validate_key_ring(name)
            valid = True
        except DomainError:
            valid = False
        out.append({"name": name, "valid": valid})
    return out


def _key_id_errors() -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for key_id in ("", "x" * 1025):
        try:
            KmsBinding(key_id)
        except DomainError as exc:
            out.append({"key_id": key_id, "error": str(exc)})
    return out


def render() -> str:
    document = {
        "description": (
            "KMS v2 envelopes and associated data as the Python sidecar writes them "
            "(operator/kustody/domain/envelope.py, aad.py), for the Go plugin in kms/. Byte "
            "strings are lowercase hex. Generated by tools/gen_kms_vectors.py."
        ),
        "seal": [
            _seal("secrets", 1, "a1b2c3", bytes(range(32))),
            _seal("cluster.secrets-2", 4294967295, "000000", b"\xff"),
            _seal("k" * 253, 7, "ffeedd", bytes(range(256)) * 16),
        ],
        "malformed": _malformed(),
        "labels": _labels(),
        "key_rings": _key_rings(),
        "key_id_errors": _key_id_errors(),
    }
    return json.dumps(document, indent=1) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the file differs")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET.relative_to(ROOT)} differs from tools/gen_kms_vectors.py's output")
            return 1
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
