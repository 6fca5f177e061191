"""The published vectors, tests/vectors/keyset_v1.json, against the library and against an
independent implementation written here from docs/keyset-format.md with cryptography's
primitives only (no kustody code), so the document and the library cannot drift together."""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import struct
import sys
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from kustody.client import Keyset, KeysetError

ROOT = Path(__file__).resolve().parents[2]
VECTORS: dict[str, Any] = json.loads((ROOT / "tests/vectors/keyset_v1.json").read_text())
KEYSET_TEXT = json.dumps(VECTORS["keyset"])


def _names(group: str) -> list[str]:
    return [v["name"] for v in VECTORS[group]]


def _vector(group: str, name: str) -> dict[str, Any]:
    return next(v for v in VECTORS[group] if v["name"] == name)


# -- the library ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", _names("oneShot"))
def test_library_decrypts_every_one_shot_vector(name: str) -> None:
    v = _vector("oneShot", name)
    keyset = Keyset.from_json(KEYSET_TEXT)
    ad = bytes.fromhex(v["associatedData"])
    assert keyset.decrypt(bytes.fromhex(v["ciphertext"]), ad) == bytes.fromhex(v["plaintext"])


@pytest.mark.parametrize("name", _names("streaming"))
def test_library_decrypts_every_streaming_vector(name: str) -> None:
    v = _vector("streaming", name)
    keyset = Keyset.from_json(KEYSET_TEXT)
    out = io.BytesIO()
    keyset.decrypt_stream(
        io.BytesIO(bytes.fromhex(v["ciphertext"])), out, bytes.fromhex(v["associatedData"])
    )
    assert out.getvalue() == bytes.fromhex(v["plaintext"])


def _library_decrypt(keyset: Keyset, kind: str, ciphertext: bytes, ad: bytes) -> None:
    if kind == "oneShot":
        keyset.decrypt(ciphertext, ad)
    else:
        keyset.decrypt_stream(io.BytesIO(ciphertext), io.BytesIO(), ad)


@pytest.mark.parametrize("name", _names("invalid"))
def test_library_rejects_every_invalid_vector_with_its_error(name: str) -> None:
    v = _vector("invalid", name)
    keyset = Keyset.from_json(KEYSET_TEXT)
    ciphertext, ad = bytes.fromhex(v["ciphertext"]), bytes.fromhex(v["associatedData"])
    with pytest.raises(KeysetError) as caught:
        _library_decrypt(keyset, v["kind"], ciphertext, ad)
    assert caught.value.reason == v["error"]


@pytest.mark.parametrize("name", _names("invalidKeysets"))
def test_library_rejects_every_invalid_keyset(name: str) -> None:
    v = _vector("invalidKeysets", name)
    with pytest.raises(KeysetError) as caught:
        Keyset.from_json(v["document"])
    assert caught.value.reason == v["error"]


def test_the_vectors_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_keyset_vectors", ROOT / "tools/gen_keyset_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run tools/gen_keyset_vectors.py"


def test_the_vectors_cover_what_the_document_promises() -> None:
    streams = VECTORS["streaming"]
    assert any(v["plaintext"] == "" for v in streams)
    assert any(len(v["plaintext"]) // 2 > 2 * v["segmentSize"] for v in streams)
    assert any(v["associatedData"] for v in streams)
    assert any(not v["associatedData"] for v in streams)
    assert any(v["plaintext"] == "" for v in VECTORS["oneShot"])
    assert {v["keyId"] for v in VECTORS["oneShot"]} == {
        k["keyId"] for k in VECTORS["keyset"]["keys"]
    }
    errors = {(v["kind"], v["error"]) for v in VECTORS["invalid"]}
    for kind in ("oneShot", "stream"):
        for error in ("DECRYPTION_FAILED", "KEY_ID_UNKNOWN", "CIPHERTEXT_MALFORMED"):
            assert (kind, error) in errors


# -- an independent implementation, from docs/keyset-format.md ------------------------------


class SpecError(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def spec_keys(document: dict[str, Any]) -> dict[int, bytes]:
    return {k["keyId"]: base64.b64decode(k["key"], validate=True) for k in document["keys"]}


def spec_key(keys: dict[int, bytes], key_id: int) -> bytes:
    if key_id not in keys:
        raise SpecError("KEY_ID_UNKNOWN")
    return keys[key_id]


def spec_decrypt(keys: dict[int, bytes], ciphertext: bytes, ad: bytes) -> bytes:
    """0x01 ‖ key id (4, BE) ‖ nonce (12) ‖ AES-256-GCM ciphertext ‖ tag (16); GCM associated
    data = the first 5 bytes ‖ ad."""
    if len(ciphertext) < 5 or ciphertext[0] != 0x01:
        raise SpecError("CIPHERTEXT_MALFORMED")
    (key_id,) = struct.unpack(">I", ciphertext[1:5])
    key = spec_key(keys, key_id)
    if len(ciphertext) < 5 + 12 + 16:
        raise SpecError("CIPHERTEXT_MALFORMED")
    try:
        return AESGCM(key).decrypt(ciphertext[5:17], ciphertext[17:], ciphertext[:5] + ad)
    except InvalidTag:
        raise SpecError("DECRYPTION_FAILED") from None


def spec_stream_key(dek: bytes, header: bytes, ad: bytes) -> bytes:
    """HKDF-SHA256(ikm = DEK, salt = header[9:25], info = header ‖ ad, length 32)."""
    return HKDF(algorithm=SHA256(), length=32, salt=header[9:25], info=header + ad).derive(dek)


def spec_decrypt_stream(keys: dict[int, bytes], stream: bytes, ad: bytes) -> bytes:
    """Header: 0x02 ‖ key id (4) ‖ segment size S (4) ‖ salt (16) ‖ nonce prefix (7). Then
    segments of S + 16 bytes, the final one shorter or equal; segment i's nonce is
    prefix ‖ i (4, BE) ‖ 0x01 if final else 0x00; no GCM associated data."""
    if len(stream) < 5 or stream[0] != 0x02:
        raise SpecError("CIPHERTEXT_MALFORMED")
    key = spec_key(keys, struct.unpack(">I", stream[1:5])[0])
    if len(stream) < 32:
        raise SpecError("CIPHERTEXT_MALFORMED")
    header = stream[:32]
    (size,) = struct.unpack(">I", header[5:9])
    if not 4096 <= size <= 64 * 1024 * 1024:
        raise SpecError("CIPHERTEXT_MALFORMED")
    gcm = AESGCM(spec_stream_key(key, header, ad))
    body = stream[32:]
    step = size + 16
    count = max(1, -(-len(body) // step))
    plaintext = b""
    for i in range(count):
        segment = body[i * step : (i + 1) * step]
        last = i == count - 1
        nonce = header[25:32] + struct.pack(">I", i) + (b"\x01" if last else b"\x00")
        try:
            chunk = gcm.decrypt(nonce, segment, None)
        except InvalidTag:
            raise SpecError("DECRYPTION_FAILED") from None
        if last and i > 0 and not chunk:
            raise SpecError("CIPHERTEXT_MALFORMED")
        plaintext += chunk
    return plaintext


def spec_encrypt(key: bytes, key_id: int, plaintext: bytes, ad: bytes, nonce: bytes) -> bytes:
    head = b"\x01" + struct.pack(">I", key_id)
    return head + nonce + AESGCM(key).encrypt(nonce, plaintext, head + ad)


def spec_encrypt_stream(
    key: bytes, key_id: int, plaintext: bytes, ad: bytes, size: int, salt: bytes, prefix: bytes
) -> bytes:
    header = b"\x02" + struct.pack(">II", key_id, size) + salt + prefix
    gcm = AESGCM(spec_stream_key(key, header, ad))
    chunks = [plaintext[i : i + size] for i in range(0, len(plaintext), size)] or [b""]
    return header + b"".join(
        gcm.encrypt(
            prefix + struct.pack(">I", i) + (b"\x01" if i == len(chunks) - 1 else b"\x00"),
            chunk,
            None,
        )
        for i, chunk in enumerate(chunks)
    )


@pytest.mark.parametrize("name", _names("oneShot"))
def test_spec_implementation_agrees_with_every_one_shot_vector(name: str) -> None:
    v = _vector("oneShot", name)
    keys = spec_keys(VECTORS["keyset"])
    ad, plaintext = bytes.fromhex(v["associatedData"]), bytes.fromhex(v["plaintext"])
    ciphertext = bytes.fromhex(v["ciphertext"])
    assert spec_decrypt(keys, ciphertext, ad) == plaintext
    nonce = bytes.fromhex(v["nonce"])
    assert spec_encrypt(keys[v["keyId"]], v["keyId"], plaintext, ad, nonce) == ciphertext


@pytest.mark.parametrize("name", _names("streaming"))
def test_spec_implementation_agrees_with_every_streaming_vector(name: str) -> None:
    v = _vector("streaming", name)
    keys = spec_keys(VECTORS["keyset"])
    ad, plaintext = bytes.fromhex(v["associatedData"]), bytes.fromhex(v["plaintext"])
    ciphertext = bytes.fromhex(v["ciphertext"])
    assert spec_decrypt_stream(keys, ciphertext, ad) == plaintext
    assert spec_stream_key(keys[v["keyId"]], ciphertext[:32], ad).hex() == v["streamKey"]
    again = spec_encrypt_stream(
        keys[v["keyId"]],
        v["keyId"],
        plaintext,
        ad,
        v["segmentSize"],
        bytes.fromhex(v["salt"]),
        bytes.fromhex(v["noncePrefix"]),
    )
    assert again == ciphertext


@pytest.mark.parametrize("name", _names("invalid"))
def test_spec_implementation_rejects_every_invalid_vector_with_its_error(name: str) -> None:
    v = _vector("invalid", name)
    keys = spec_keys(VECTORS["keyset"])
    ciphertext, ad = bytes.fromhex(v["ciphertext"]), bytes.fromhex(v["associatedData"])
    decrypt = spec_decrypt if v["kind"] == "oneShot" else spec_decrypt_stream
    with pytest.raises(SpecError) as caught:
        decrypt(keys, ciphertext, ad)
    assert caught.value.reason == v["error"]
