"""kustody.client.keyset: the keyset file and one-shot ciphertexts (format 0x01).

Streams are in test_keyset_stream.py, the published vectors in test_keyset_vectors.py."""

from __future__ import annotations

import base64
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kustody.client import (
    DecryptionFailed,
    InvalidKeyset,
    Keyset,
    KeysetError,
    KeysetUnreadable,
    MalformedCiphertext,
    MessageTooLarge,
    UnknownKeyId,
    aead,
)

FEW = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

GEN1, GEN2, GEN3 = os.urandom(32), os.urandom(32), os.urandom(32)
ID1, ID2, ID3 = 0x1A2B3C4D, 0x00000007, 0xFFFFFFFF


def entry(key_id: int, generation: int, dek: bytes, primary: bool = False) -> dict[str, Any]:
    return {
        "keyId": key_id,
        "generation": generation,
        "status": "Primary" if primary else "DecryptOnly",
        "key": base64.b64encode(dek).decode(),
    }


def document(
    *keys: dict[str, Any], namespace: str = "shop", name: str = "orders"
) -> dict[str, Any]:
    primary = next(k["keyId"] for k in keys if k["status"] == "Primary")
    return {
        "format": "kustody.io/keyset/v1",
        "dataKey": {"namespace": namespace, "name": name},
        "primaryKeyId": primary,
        "keys": list(keys),
    }


def keyset(*keys: dict[str, Any]) -> Keyset:
    return Keyset.from_json(json.dumps(document(*keys)))


ONLY_GEN1 = keyset(entry(ID1, 1, GEN1, primary=True))
GEN2_PRIMARY = keyset(entry(ID1, 1, GEN1), entry(ID2, 2, GEN2, primary=True))
GEN1_REMOVED = keyset(entry(ID2, 2, GEN2), entry(ID3, 3, GEN3, primary=True))


@FEW
@given(plaintext=st.binary(max_size=3000), associated_data=st.binary(max_size=64))
def test_round_trip(plaintext: bytes, associated_data: bytes) -> None:
    ciphertext = GEN2_PRIMARY.encrypt(plaintext, associated_data)
    assert GEN2_PRIMARY.decrypt(ciphertext, associated_data) == plaintext


@pytest.mark.parametrize("size", [0, 1, 65_535, 200_000, 3 * 1024 * 1024])
def test_round_trip_of_large_messages(size: int) -> None:
    plaintext = os.urandom(size)
    first = GEN2_PRIMARY.encrypt(plaintext, b"ad")
    second = GEN2_PRIMARY.encrypt(plaintext, b"ad")
    assert first != second
    assert GEN2_PRIMARY.decrypt(first, b"ad") == plaintext
    assert GEN2_PRIMARY.decrypt(bytearray(second), b"ad") == plaintext
    assert GEN2_PRIMARY.decrypt(memoryview(second), b"ad") == plaintext


@pytest.mark.parametrize("direct", [True, False])
def test_large_messages_are_the_same_format_with_or_without_the_c_api(
    direct: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not direct:
        monkeypatch.setattr(aead, "_new_bytes", None)
    plaintext = os.urandom(100_000)
    nonce = os.urandom(12)
    made = aead._seal(aead.new_aead(GEN2), aead.header(1, ID2), plaintext, b"ad", nonce)
    assert type(made) is bytes
    expected = b"\x01" + ID2.to_bytes(4, "big") + nonce
    expected += aead.new_aead(GEN2).encrypt(nonce, plaintext, expected[:5] + b"ad")
    assert made == expected
    assert GEN2_PRIMARY.decrypt(made, b"ad") == plaintext
    assert hash(made) == hash(expected)


def test_layout_is_format_byte_key_id_nonce_then_ciphertext_and_tag() -> None:
    ciphertext = GEN2_PRIMARY.encrypt(b"hello")
    assert ciphertext[0] == 0x01
    assert ciphertext[1:5] == ID2.to_bytes(4, "big")
    assert len(ciphertext) == 1 + 4 + 12 + len(b"hello") + 16
    nonces = {GEN2_PRIMARY.encrypt(b"hello")[5:17] for _ in range(50)}
    assert len(nonces) == 50


def test_encrypt_always_uses_the_primary_and_decrypt_any_retained_generation() -> None:
    old = ONLY_GEN1.encrypt(b"written under generation 1")
    assert old[1:5] == ID1.to_bytes(4, "big")
    assert GEN2_PRIMARY.decrypt(old) == b"written under generation 1"
    assert GEN2_PRIMARY.encrypt(b"new")[1:5] == ID2.to_bytes(4, "big")
    assert GEN2_PRIMARY.primary_key_id == ID2
    assert GEN2_PRIMARY.key_ids == (ID1, ID2)


def test_a_removed_generation_gives_an_error_naming_its_key_id() -> None:
    old = ONLY_GEN1.encrypt(b"written under generation 1")
    with pytest.raises(UnknownKeyId) as caught:
        GEN1_REMOVED.decrypt(old)
    assert caught.value.key_id == ID1
    message = str(caught.value)
    assert "0x1a2b3c4d" in message
    assert "removed" in message
    assert "another DataKey" in message
    assert "shop/orders" in message
    assert caught.value.reason == "KEY_ID_UNKNOWN"


@FEW
@given(plaintext=st.binary(max_size=200), data=st.data())
def test_any_truncation_is_an_error(plaintext: bytes, data: st.DataObject) -> None:
    ciphertext = GEN2_PRIMARY.encrypt(plaintext, b"ad")
    cut = data.draw(st.integers(0, len(ciphertext) - 1))
    with pytest.raises(KeysetError):
        GEN2_PRIMARY.decrypt(ciphertext[:cut], b"ad")


@FEW
@given(plaintext=st.binary(max_size=200), data=st.data())
def test_any_bit_flip_is_an_error(plaintext: bytes, data: st.DataObject) -> None:
    ciphertext = bytearray(GEN2_PRIMARY.encrypt(plaintext, b"ad"))
    position = data.draw(st.integers(0, len(ciphertext) - 1))
    ciphertext[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises((DecryptionFailed, UnknownKeyId, MalformedCiphertext)):
        GEN2_PRIMARY.decrypt(bytes(ciphertext), b"ad")


@FEW
@given(plaintext=st.binary(max_size=200), extra=st.binary(min_size=1, max_size=40))
def test_extension_is_an_error(plaintext: bytes, extra: bytes) -> None:
    ciphertext = GEN2_PRIMARY.encrypt(plaintext)
    with pytest.raises(DecryptionFailed):
        GEN2_PRIMARY.decrypt(ciphertext + extra)


@FEW
@given(
    plaintext=st.binary(max_size=200), right=st.binary(max_size=32), wrong=st.binary(max_size=32)
)
def test_wrong_associated_data_is_an_error(plaintext: bytes, right: bytes, wrong: bytes) -> None:
    if right == wrong:
        return
    ciphertext = GEN2_PRIMARY.encrypt(plaintext, right)
    with pytest.raises(DecryptionFailed):
        GEN2_PRIMARY.decrypt(ciphertext, wrong)


def test_a_key_id_changed_to_another_retained_key_fails_authentication() -> None:
    ciphertext = GEN2_PRIMARY.encrypt(b"data")
    moved = ciphertext[:1] + ID1.to_bytes(4, "big") + ciphertext[5:]
    with pytest.raises(DecryptionFailed):
        GEN2_PRIMARY.decrypt(moved)


@pytest.mark.parametrize(
    ("ciphertext", "error"),
    [
        (b"", MalformedCiphertext),
        (b"\x01\x00\x00", MalformedCiphertext),
        (b"\x03" + bytes(40), MalformedCiphertext),
        (b"\x00" + bytes(40), MalformedCiphertext),
        (b"\x01" + ID2.to_bytes(4, "big") + bytes(27), MalformedCiphertext),  # 32 < 33 bytes
        (b"\x02" + ID2.to_bytes(4, "big") + bytes(60), MalformedCiphertext),  # a stream
    ],
)
def test_malformed_ciphertexts_are_typed_errors(ciphertext: bytes, error: type[Exception]) -> None:
    with pytest.raises(error) as caught:
        GEN2_PRIMARY.decrypt(ciphertext)
    assert caught.value.__traceback__ is not None
    assert str(caught.value).startswith("CIPHERTEXT_MALFORMED: ")


def test_a_stream_given_to_decrypt_says_to_use_decrypt_stream() -> None:
    with pytest.raises(MalformedCiphertext, match="decrypt_stream"):
        GEN2_PRIMARY.decrypt(b"\x02" + ID2.to_bytes(4, "big") + bytes(60))


def test_reencrypt_moves_to_the_primary() -> None:
    old = ONLY_GEN1.encrypt(b"record", b"row-17")
    new = GEN2_PRIMARY.reencrypt(old, b"row-17")
    assert new[1:5] == ID2.to_bytes(4, "big")
    assert GEN2_PRIMARY.decrypt(new, b"row-17") == b"record"
    after_removal = keyset(entry(ID2, 2, GEN2, primary=True))
    assert after_removal.decrypt(new, b"row-17") == b"record"
    with pytest.raises(UnknownKeyId):
        after_removal.decrypt(old, b"row-17")


def test_reencrypt_returns_a_ciphertext_already_under_the_primary_unchanged() -> None:
    current = GEN2_PRIMARY.encrypt(b"record", b"ad")
    assert GEN2_PRIMARY.reencrypt(current, b"ad") is current
    with pytest.raises(DecryptionFailed):  # but it is still checked
        GEN2_PRIMARY.reencrypt(current, b"other")


@FEW
@given(data=st.data())
def test_reencrypt_never_launders_a_damaged_ciphertext(data: st.DataObject) -> None:
    old = bytearray(ONLY_GEN1.encrypt(b"record"))
    position = data.draw(st.integers(5, len(old) - 1))
    old[position] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(DecryptionFailed):
        GEN2_PRIMARY.reencrypt(bytes(old))


def test_one_shot_limits_are_typed_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(aead, "MAX_PLAINTEXT_BYTES", 10)
    with pytest.raises(MessageTooLarge, match="encrypt_stream"):
        GEN2_PRIMARY.encrypt(bytes(11))
    monkeypatch.setattr(aead, "MAX_ASSOCIATED_DATA_BYTES", 3)
    with pytest.raises(MessageTooLarge):
        GEN2_PRIMARY.encrypt(b"", b"four")


# -- the keyset file ------------------------------------------------------------------------


def valid() -> dict[str, Any]:
    return document(entry(ID1, 1, GEN1), entry(ID2, 2, GEN2, primary=True))


def _set(path: tuple[str | int, ...], value: Any) -> dict[str, Any]:
    doc = valid()
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


def _drop(path: tuple[str | int, ...]) -> dict[str, Any]:
    doc = valid()
    target: Any = doc
    for step in path[:-1]:
        target = target[step]
    del target[path[-1]]
    return doc


INVALID_DOCUMENTS = {
    "not an object": [],
    "wrong format": _set(("format",), "kustody.io/keyset/v2"),
    "unknown top field": _set(("createdAt",), "2026-01-01"),
    "missing keys": _drop(("keys",)),
    "missing dataKey": _drop(("dataKey",)),
    "dataKey not an object": _set(("dataKey",), "shop/orders"),
    "bad namespace": _set(("dataKey", "namespace"), "Shop"),
    "namespace too long": _set(("dataKey", "namespace"), "a" * 64),
    "bad name": _set(("dataKey", "name"), "orders/x"),
    "empty name": _set(("dataKey", "name"), ""),
    "unknown dataKey field": _set(("dataKey", "uid"), "x"),
    "primaryKeyId a string": _set(("primaryKeyId",), "7"),
    "primaryKeyId a float": _set(("primaryKeyId",), 7.0),
    "primaryKeyId a bool": _set(("primaryKeyId",), True),
    "primaryKeyId negative": _set(("primaryKeyId",), -1),
    "primaryKeyId too big": _set(("primaryKeyId",), 2**32),
    "primaryKeyId not the primary": _set(("primaryKeyId",), ID1),
    "keys empty": _set(("keys",), []),
    "keys not a list": _set(("keys",), {"a": 1}),
    "key not an object": _set(("keys", 0), "x"),
    "keyId missing": _drop(("keys", 0, "keyId")),
    "keyId a bool": _set(("keys", 0, "keyId"), False),
    "keyId too big": _set(("keys", 0, "keyId"), 2**32),
    "generation zero": _set(("keys", 0, "generation"), 0),
    "generation a float": _set(("keys", 0, "generation"), 1.5),
    "status unknown": _set(("keys", 0, "status"), "Disabled"),
    "status lower case": _set(("keys", 0, "status"), "primary"),
    "status null": _set(("keys", 0, "status"), None),
    "two primaries": _set(("keys", 0, "status"), "Primary"),
    "no primary": _set(("keys", 1, "status"), "DecryptOnly"),
    "duplicate key id": _set(("keys", 0, "keyId"), ID2),
    "duplicate generation": _set(("keys", 0, "generation"), 2),
    "unknown key field": _set(("keys", 0, "createdAt"), "x"),
    "key not a string": _set(("keys", 0, "key"), 5),
    "key not base64": _set(("keys", 0, "key"), "!!!!" * 11),
    "key url-safe base64": _set(
        ("keys", 0, "key"), base64.urlsafe_b64encode(b"\xfb" * 32).decode()
    ),
    "key unpadded": _set(("keys", 0, "key"), base64.b64encode(GEN1).decode().rstrip("=")),
    "key with whitespace": _set(("keys", 0, "key"), " " + base64.b64encode(GEN1).decode()),
    "key of 16 bytes": _set(("keys", 0, "key"), base64.b64encode(GEN1[:16]).decode()),
    "key of 0 bytes": _set(("keys", 0, "key"), ""),
}


@pytest.mark.parametrize("name", INVALID_DOCUMENTS)
def test_invalid_keysets_are_a_clear_typed_error(name: str) -> None:
    text = json.dumps(INVALID_DOCUMENTS[name])
    with pytest.raises(InvalidKeyset) as caught:
        Keyset.from_json(text)
    message = str(caught.value)
    assert message.startswith("KEYSET_INVALID: keyset file: ")
    for dek in (GEN1, GEN2):
        assert base64.b64encode(dek).decode()[:12] not in message
        assert base64.b64encode(dek[:16]).decode()[:12] not in message


def test_short_keys_name_spec_length_32() -> None:
    with pytest.raises(InvalidKeyset, match=r"spec\.length: 32") as caught:
        Keyset.from_json(json.dumps(INVALID_DOCUMENTS["key of 16 bytes"]))
    assert "0x1a2b3c4d" in str(caught.value)
    assert "16-byte" in str(caught.value)


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xff\xfe{}",
        json.dumps(valid()).encode("utf-16"),
        b"{" * 100_000,
        b"[" * 100_000 + b"]" * 100_000,
        b"NaN",
        json.dumps(valid()).replace('"format"', '"format": 1, "format"', 1).encode(),
        json.dumps(valid()).encode() + b" trailing",
        b'{"format": 1e999}',
        b'{"primaryKeyId": ' + b"9" * 5000 + b"}",
    ],
)
def test_documents_that_are_not_json_objects_are_invalid(raw: bytes) -> None:
    with pytest.raises(InvalidKeyset):
        Keyset.from_json(raw)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5)
    ),
    max_leaves=20,
)


@FEW
@given(garbage=st.binary(max_size=200) | JSON.map(lambda v: json.dumps(v).encode()))
def test_garbage_is_invalid_keyset_never_another_exception(garbage: bytes) -> None:
    with pytest.raises(InvalidKeyset):
        Keyset.from_json(garbage)


FIELD_PATHS = [
    ("format",),
    ("dataKey",),
    ("dataKey", "namespace"),
    ("dataKey", "name"),
    ("primaryKeyId",),
    ("keys",),
    ("keys", 0),
    ("keys", 1, "keyId"),
    ("keys", 1, "generation"),
    ("keys", 0, "status"),
    ("keys", 1, "key"),
]


@FEW
@given(path=st.sampled_from(FIELD_PATHS), value=JSON)
def test_any_field_replaced_by_any_json_parses_or_is_invalid_keyset(
    path: tuple[str | int, ...], value: Any
) -> None:
    try:
        result = Keyset.from_json(json.dumps(_set(path, value)))
    except InvalidKeyset:
        return
    assert result.primary_key_id == ID2


def test_repr_and_errors_hold_no_key_material() -> None:
    shown = repr(GEN2_PRIMARY) + str(GEN2_PRIMARY)
    assert "0x00000007" in shown
    assert "shop/orders" in shown
    for dek in (GEN1, GEN2):
        assert base64.b64encode(dek).decode() not in shown
        assert dek.hex() not in shown
        assert repr(dek) not in shown
    with pytest.raises(TypeError):
        pickle.dumps(GEN2_PRIMARY)


def test_load_reads_the_file_kustody_unwrap_writes(tmp_path: Path) -> None:
    path = tmp_path / "keyset.json"
    path.write_text(json.dumps(valid()))
    path.chmod(0o400)
    loaded = Keyset.load(path)
    assert loaded.decrypt(GEN2_PRIMARY.encrypt(b"x")) == b"x"
    assert str(loaded.data_key) == "shop/orders"


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(KeysetUnreadable, match=r"missing\.json"):
        Keyset.load(tmp_path / "missing.json")
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (1024 * 1024 + 1))
    with pytest.raises(KeysetUnreadable, match="larger than"):
        Keyset.load(big)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_set(("keys", 0, "status"), "Primary")))
    with pytest.raises(InvalidKeyset, match=r"bad\.json: keyset file: exactly one key"):
        Keyset.load(bad)


def test_the_keyset_library_is_imported_only_when_used() -> None:
    code = (
        "import sys, kustody.client\n"
        "assert 'cryptography' not in sys.modules\n"
        "from kustody.client import Keyset, KeysetError\n"
        "assert 'cryptography' in sys.modules\n"
        "assert Keyset.__module__ == 'kustody.client.keyset'\n"
        "assert kustody.client.Keyset is Keyset\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_threads_share_a_keyset() -> None:
    from concurrent.futures import ThreadPoolExecutor

    messages = [os.urandom(size) for size in (10, 70_000, 300_000, 1_000_000) * 4]
    with ThreadPoolExecutor(4) as pool:
        ciphertexts = list(pool.map(GEN2_PRIMARY.encrypt, messages))
        assert list(pool.map(GEN2_PRIMARY.decrypt, ciphertexts)) == messages
