"""Associated data for sealing a DEK: binds the ciphertext to where it belongs.

The encoding is injective: every variable field is length-prefixed (u32, big-endian) and the
kind of binding is tagged, so two different bindings never produce the same bytes. The
envelope header (format tag, version, KeyRing, KEK version) is prepended, so editing the
header makes authentication fail.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from kustody.domain.errors import InvalidArgument

MAX_FIELD_BYTES = 253
MAX_CONTEXT_ENTRIES = 64
MAX_CONTEXT_KEY_BYTES = 256
MAX_CONTEXT_VALUE_BYTES = 1024
MAX_KEY_ID_BYTES = 1024
_DATA_KEY_TAG = b"D"
_KMS_TAG = b"K"


def _utf8(value: str, what: str, limit: int) -> bytes:
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidArgument(f"{what} is not valid UTF-8") from None
    if len(raw) > limit:
        raise InvalidArgument(f"{what} is {len(raw)} bytes; the limit is {limit}")
    return raw


_U32 = struct.Struct(">I").pack


def _lp(raw: bytes) -> bytes:
    return _U32(len(raw)) + raw


def _fast_encode(namespace: str, name: str, context: Mapping[str, str]) -> bytes | None:
    """The encoding when every field is valid and within its limit, else None (slow path)."""
    try:
        ns, nm = namespace.encode(), name.encode()
        entries = sorted((k.encode(), v.encode()) for k, v in context.items())
    except UnicodeEncodeError:
        return None
    if len(ns) > MAX_FIELD_BYTES or len(nm) > MAX_FIELD_BYTES:
        return None
    parts = [_DATA_KEY_TAG, _U32(len(ns)), ns, _U32(len(nm)), nm, _U32(len(entries))]
    for k, v in entries:
        if len(k) > MAX_CONTEXT_KEY_BYTES or len(v) > MAX_CONTEXT_VALUE_BYTES:
            return None
        parts += (_U32(len(k)), k, _U32(len(v)), v)
    return b"".join(parts)


@dataclass(frozen=True)
class Binding:
    """A DataKey's place: namespace, name and the user's encryptionContext."""

    namespace: str
    name: str
    context: Mapping[str, str] = field(default_factory=dict)
    # The encoding, computed once at construction (it also validates the fields).
    _encoded: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if not self.namespace or not self.name:
            raise InvalidArgument("a binding needs a namespace and a DataKey name")
        if len(self.context) > MAX_CONTEXT_ENTRIES:
            raise InvalidArgument(
                f"encryptionContext has {len(self.context)} entries; "
                f"the limit is {MAX_CONTEXT_ENTRIES}"
            )
        object.__setattr__(self, "context", MappingProxyType(dict(self.context)))
        encoded = _fast_encode(self.namespace, self.name, self.context)
        object.__setattr__(self, "_encoded", self._encode() if encoded is None else encoded)

    def encode(self) -> bytes:
        return self._encoded

    def _encode(self) -> bytes:
        entries = sorted(
            (
                _utf8(k, "an encryptionContext key", MAX_CONTEXT_KEY_BYTES),
                _utf8(v, "an encryptionContext value", MAX_CONTEXT_VALUE_BYTES),
            )
            for k, v in self.context.items()
        )
        parts = [
            _DATA_KEY_TAG,
            _lp(_utf8(self.namespace, "namespace", MAX_FIELD_BYTES)),
            _lp(_utf8(self.name, "DataKey name", MAX_FIELD_BYTES)),
            struct.pack(">I", len(entries)),
        ]
        parts.extend(_lp(k) + _lp(v) for k, v in entries)
        return b"".join(parts)


@dataclass(frozen=True)
class KmsBinding:
    """A Kubernetes KMS v2 seed: bound to the key_id kube-apiserver stores next to it."""

    key_id: str
    _encoded: bytes = field(init=False, repr=False, compare=False, default=b"")

    def __post_init__(self) -> None:
        if not self.key_id:
            raise InvalidArgument("a KMS binding needs a key_id")
        encoded = _KMS_TAG + _lp(_utf8(self.key_id, "key_id", MAX_KEY_ID_BYTES))
        object.__setattr__(self, "_encoded", encoded)

    def encode(self) -> bytes:
        return self._encoded


def associated_data(header: bytes, binding: Binding | KmsBinding) -> bytes:
    """AAD = envelope header ‖ encoded binding."""
    return header + binding._encoded
