"""A DataKey's keyset: encrypt under the primary generation, decrypt under any retained one.

The keyset file (``kustody.io/keyset/v1``) is what ``kustody unwrap`` writes to a memory
filesystem: every retained DEK generation of one DataKey, each with a key id, one of them the
primary. Every ciphertext starts with a format byte and the key id of the key that made it, so
decryption picks the right generation and a ciphertext from a removed generation fails with an
error naming its key id. Byte layouts, derivations and test vectors: docs/keyset-format.md.

The byte formats live in :mod:`~kustody.client.aead` (one-shot) and
:mod:`~kustody.client.aead_stream` (streaming), the only modules of ``kustody.client`` that import
``cryptography`` (an import-linter contract keeps it so); ``kustody.client`` loads this module on
first use of :class:`Keyset`, so a workload that only unwraps never imports ``cryptography``.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

from kustody.client import aead, aead_stream
from kustody.client.aead_errors import (
    InvalidKeyset,
    KeysetUnreadable,
    MalformedCiphertext,
    UnknownKeyId,
)

FORMAT = "kustody.io/keyset/v1"
MAX_FILE_BYTES = 1024 * 1024
MAX_KEYS = 1000
MAX_KEY_ID = 2**32 - 1
DEFAULT_SEGMENT_SIZE = aead_stream.DEFAULT_SEGMENT_SIZE

_TOP_FIELDS = frozenset({"format", "dataKey", "primaryKeyId", "keys"})
_DATA_KEY_FIELDS = frozenset({"namespace", "name"})
_KEY_FIELDS = frozenset({"keyId", "generation", "status", "key"})
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


class KeyStatus(enum.StrEnum):
    PRIMARY = "Primary"
    DECRYPT_ONLY = "DecryptOnly"


@dataclass(frozen=True)
class DataKeyRef:
    """The DataKey a keyset belongs to."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


class _Key:
    """One generation's key. The DEK stays in here; repr and str never show it."""

    __slots__ = ("_dek", "cipher", "generation", "header", "key_id", "status")

    def __init__(self, key_id: int, generation: int, status: KeyStatus, dek: bytes) -> None:
        self.key_id = key_id
        self.generation = generation
        self.status = status
        self._dek = dek
        self.cipher = aead.new_aead(dek)
        self.header = aead.header(aead.FORMAT_ONE_SHOT, key_id)

    @property
    def dek(self) -> bytes:
        return self._dek

    def __repr__(self) -> str:
        return f"<key 0x{self.key_id:08x} generation {self.generation} {self.status}>"


class Keyset:
    """Every retained generation of one DataKey's DEK. Build it with :meth:`load` or
    :meth:`from_json`. Immutable and safe to share between threads; not picklable (it holds
    key material)."""

    __slots__ = ("_by_id", "_data_key", "_primary")

    def __init__(self, data_key: DataKeyRef, keys: Sequence[_Key]) -> None:
        """Internal: use :meth:`load` or :meth:`from_json`."""
        primaries = [k for k in keys if k.status is KeyStatus.PRIMARY]
        if len(primaries) != 1 or len({k.key_id for k in keys}) != len(keys):
            raise InvalidKeyset("a keyset has exactly one primary key and unique key ids")
        self._data_key = data_key
        self._primary = primaries[0]
        self._by_id = {k.key_id: k for k in sorted(keys, key=lambda k: k.generation)}

    # -- construction --------------------------------------------------------------------

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Keyset:
        """Read a keyset file written by ``kustody unwrap``."""
        where = Path(path)
        try:
            with where.open("rb") as fh:
                raw = fh.read(MAX_FILE_BYTES + 1)
        except OSError as exc:
            raise KeysetUnreadable(
                f"cannot read keyset file {where}: {exc.strerror or type(exc).__name__}"
            ) from None
        if len(raw) > MAX_FILE_BYTES:
            raise KeysetUnreadable(f"keyset file {where} is larger than {MAX_FILE_BYTES} bytes")
        try:
            return cls.from_json(raw)
        except InvalidKeyset as exc:
            raise InvalidKeyset(f"{where}: {exc.message}") from None

    @classmethod
    def from_json(cls, data: bytes | str) -> Keyset:
        """Parse a keyset document strictly: unknown or missing fields, wrong types, duplicate
        JSON keys, two primaries or none, repeated key ids or generations and keys that are not
        32 bytes are all :class:`InvalidKeyset`."""
        return _parse(data)

    # -- what is in it ---------------------------------------------------------------------

    @property
    def data_key(self) -> DataKeyRef:
        return self._data_key

    @property
    def primary_key_id(self) -> int:
        return self._primary.key_id

    @property
    def key_ids(self) -> tuple[int, ...]:
        """Every key id, oldest generation first."""
        return tuple(self._by_id)

    def __repr__(self) -> str:
        keys = ", ".join(
            f"0x{k.key_id:08x}:g{k.generation}{'*' if k is self._primary else ''}"
            for k in self._by_id.values()
        )
        return f"Keyset(data_key={self._data_key}, primary=0x{self.primary_key_id:08x}, [{keys}])"

    def __reduce__(self) -> NoReturn:
        raise TypeError("a Keyset holds key material and cannot be pickled")

    # -- one-shot ----------------------------------------------------------------------------

    def encrypt(self, plaintext: bytes, associated_data: bytes = b"") -> bytes:
        """Encrypt under the primary key with a fresh random nonce (format 0x01)."""
        primary = self._primary
        return aead.seal(primary.cipher, primary.header, plaintext, associated_data)

    def decrypt(self, ciphertext: bytes, associated_data: bytes = b"") -> bytes:
        """Decrypt a one-shot ciphertext with the key its key id names."""
        return aead.unseal(self._one_shot_key(ciphertext).cipher, ciphertext, associated_data)

    def reencrypt(self, ciphertext: bytes, associated_data: bytes = b"") -> bytes:
        """Move a one-shot ciphertext to the primary key. A ciphertext already under the
        primary is verified and returned unchanged (the same object), so a re-encryption job
        can skip writing it back; any other comes back encrypted under the primary."""
        key = self._one_shot_key(ciphertext)
        plaintext = aead.unseal(key.cipher, ciphertext, associated_data)
        if key is self._primary:
            return ciphertext
        return self.encrypt(plaintext, associated_data)

    def _one_shot_key(self, ciphertext: bytes) -> _Key:
        fmt, key_id = aead.peek(ciphertext)
        if fmt != aead.FORMAT_ONE_SHOT:
            raise MalformedCiphertext(
                "this is a streaming ciphertext (format 0x02); use decrypt_stream, not decrypt"
            )
        return self._key(key_id)

    # -- streaming ---------------------------------------------------------------------------

    def encrypt_stream(
        self,
        src: BinaryIO,
        dst: BinaryIO,
        associated_data: bytes = b"",
        *,
        segment_size: int = DEFAULT_SEGMENT_SIZE,
    ) -> None:
        """Encrypt ``src`` to ``dst`` under the primary key in constant memory (format 0x02).
        ``segment_size`` (plaintext bytes per segment, 4 KiB to 64 MiB) trades memory for
        per-segment overhead; it is written in the header, the reader needs nothing."""
        sealer = aead_stream.Sealer(
            self._primary.dek, self._primary.key_id, associated_data, segment_size
        )
        aead_stream.encrypt(sealer, src, dst)

    def decrypt_stream(self, src: BinaryIO, dst: BinaryIO, associated_data: bytes = b"") -> None:
        """Decrypt a stream from ``src`` to ``dst`` in constant memory.

        Each segment is written to ``dst`` only after its tag verified, so ``dst`` only ever
        receives genuine plaintext in order. But if the stream was truncated or tampered with,
        the error comes *after* the segments before the damage were written: on any
        :class:`~kustody.client.KeysetError`, discard ``dst`` (write to a temporary name and
        rename it into place only when this returns)."""
        opened = aead_stream.open_stream(src)
        key = self._key(opened.key_id)
        for plaintext, _ in opened.segments(key.dek, src, associated_data):
            aead_stream.write_all(dst, plaintext)

    def reencrypt_stream(self, src: BinaryIO, dst: BinaryIO, associated_data: bytes = b"") -> None:
        """Decrypt a stream with whatever key it names and write it encrypted under the primary
        (fresh salt, same segment size), in constant memory. The new stream's final segment is
        written only after the old stream verified to its end, so a damaged input never yields
        a valid shorter output; on error, discard ``dst`` as with :meth:`decrypt_stream`."""
        opened = aead_stream.open_stream(src)
        key = self._key(opened.key_id)
        sealer = aead_stream.Sealer(
            self._primary.dek, self._primary.key_id, associated_data, opened.segment_size
        )
        segments = opened.segments(key.dek, src, associated_data)
        aead_stream.write_all(dst, sealer.header)
        for plaintext, last in segments:
            aead_stream.write_all(dst, sealer.seal(plaintext, last))

    # -- keys ----------------------------------------------------------------------------------

    def _keys(self) -> list[_Key]:
        return list(self._by_id.values())

    def _key(self, key_id: int) -> _Key:
        key = self._by_id.get(key_id)
        if key is not None:
            return key
        held = ", ".join(f"0x{k.key_id:08x} (generation {k.generation})" for k in self._keys())
        raise UnknownKeyId(
            f"the ciphertext was encrypted under key id 0x{key_id:08x}, which is not in the "
            f"keyset of DataKey {self._data_key} (it holds {held}): that generation was "
            "removed from the DataKey, or the ciphertext belongs to another DataKey",
            key_id,
        )


# -- parsing -------------------------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    raise InvalidKeyset(f"keyset file: {message}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            _fail(f"the JSON object repeats the field {json.dumps(name)[:80]}")
        result[name] = value
    return result


def _no_constant(name: str) -> NoReturn:
    _fail(f"{name} is not valid JSON")


def _fields(value: object, where: str, expected: frozenset[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        _fail(f"{where} must be a JSON object")
    missing = sorted(expected - value.keys())
    if missing:
        _fail(f"{where} lacks the field(s) {', '.join(missing)}")
    unknown = sorted(value.keys() - expected)
    if unknown:
        names = ", ".join(json.dumps(n)[:40] for n in unknown[:5])
        _fail(f"{where} has unknown field(s) {names}; it has only {', '.join(sorted(expected))}")
    return value


def _uint(value: object, where: str, low: int, high: int) -> int:
    if type(value) is not int or not low <= value <= high:
        _fail(f"{where} must be an integer from {low} to {high}")
    return value


def _parse(data: bytes | str) -> Keyset:
    if isinstance(data, bytes | bytearray | memoryview):
        if len(data) > MAX_FILE_BYTES:
            _fail(f"the document is larger than {MAX_FILE_BYTES} bytes")
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            _fail("the document is not UTF-8")
    elif isinstance(data, str):
        text = data
    else:
        raise TypeError("from_json takes bytes or str")
    if len(text) > MAX_FILE_BYTES:
        _fail(f"the document is larger than {MAX_FILE_BYTES} bytes")
    try:
        doc = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except InvalidKeyset:
        raise
    except (ValueError, RecursionError):
        _fail("the document is not valid JSON")
    top = _fields(doc, "the document", _TOP_FIELDS)
    if top["format"] != FORMAT:
        _fail(f"format must be {json.dumps(FORMAT)}")
    ref = _fields(top["dataKey"], "dataKey", _DATA_KEY_FIELDS)
    namespace, name = ref["namespace"], ref["name"]
    if not isinstance(namespace, str) or len(namespace) > 63 or not _DNS_LABEL.fullmatch(namespace):
        _fail("dataKey.namespace must be a Kubernetes namespace name")
    if not isinstance(name, str) or len(name) > 253 or not _DNS_SUBDOMAIN.fullmatch(name):
        _fail("dataKey.name must be a Kubernetes object name (DNS subdomain)")
    data_key = DataKeyRef(namespace, name)
    primary_id = _uint(top["primaryKeyId"], "primaryKeyId", 0, MAX_KEY_ID)
    entries = top["keys"]
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_KEYS:
        _fail(f"keys must be a list of 1 to {MAX_KEYS} keys")
    keys = [_parse_key(entry, f"keys[{i}]") for i, entry in enumerate(entries)]
    seen_ids: set[int] = set()
    seen_generations: set[int] = set()
    for key in keys:
        if key.key_id in seen_ids:
            _fail(f"key id 0x{key.key_id:08x} appears more than once")
        if key.generation in seen_generations:
            _fail(f"generation {key.generation} appears more than once")
        seen_ids.add(key.key_id)
        seen_generations.add(key.generation)
    primaries = [k for k in keys if k.status is KeyStatus.PRIMARY]
    if len(primaries) != 1:
        _fail(f"exactly one key must have status Primary, found {len(primaries)}")
    if primaries[0].key_id != primary_id:
        _fail(
            f"primaryKeyId is 0x{primary_id:08x} but the Primary key has key id "
            f"0x{primaries[0].key_id:08x}"
        )
    return Keyset(data_key, keys)


def _parse_key(entry: object, where: str) -> _Key:
    fields = _fields(entry, where, _KEY_FIELDS)
    key_id = _uint(fields["keyId"], f"{where}.keyId", 0, MAX_KEY_ID)
    generation = _uint(fields["generation"], f"{where}.generation", 1, 2**63 - 1)
    try:
        status = KeyStatus(fields["status"])
    except (ValueError, TypeError):
        _fail(f'{where}.status must be "Primary" or "DecryptOnly"')
    encoded = fields["key"]
    if not isinstance(encoded, str):
        _fail(f"{where}.key must be a base64 string")
    try:
        dek = base64.b64decode(encoded.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        _fail(f"{where}.key is not valid standard base64")
    if base64.b64encode(dek).decode("ascii") != encoded:
        _fail(f"{where}.key is not canonical padded standard base64")
    if len(dek) != aead.KEY_BYTES:
        _fail(
            f"{where} (key id 0x{key_id:08x}, generation {generation}) holds a {len(dek)}-byte "
            f"key; the keyset library uses AES-256 and needs {aead.KEY_BYTES}-byte keys (a "
            "DataKey with spec.length: 32)"
        )
    return _Key(key_id, generation, status, dek)
