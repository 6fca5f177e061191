"""Workload client for Kustody: unwrap a DataKey's wrapped key at run time, and encrypt and
decrypt with the DataKey's keyset.

Unwrapping depends only on grpcio, protobuf and the standard library (an import-linter contract
keeps it so). See docs/unwrap.md. The keyset library (:class:`Keyset`, docs/keyset-format.md)
also needs ``cryptography``; it is imported on first use of one of its names, so a workload
that only unwraps never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kustody.client.errors import Reason, UnwrapError
from kustody.client.secretdir import WrappedKey, read_secret_dir
from kustody.client.unwrapper import UnwrapClient, Unwrapped, default_client, unwrap

if TYPE_CHECKING:
    from kustody.client.aead_errors import (
        DecryptionFailed,
        InvalidKeyset,
        KeysetError,
        KeysetUnreadable,
        MalformedCiphertext,
        MessageTooLarge,
        UnknownKeyId,
    )
    from kustody.client.keyset import DataKeyRef, Keyset

_KEYSET_NAMES = {
    "DataKeyRef": "kustody.client.keyset",
    "Keyset": "kustody.client.keyset",
    "DecryptionFailed": "kustody.client.aead_errors",
    "InvalidKeyset": "kustody.client.aead_errors",
    "KeysetError": "kustody.client.aead_errors",
    "KeysetUnreadable": "kustody.client.aead_errors",
    "MalformedCiphertext": "kustody.client.aead_errors",
    "MessageTooLarge": "kustody.client.aead_errors",
    "UnknownKeyId": "kustody.client.aead_errors",
}


def __getattr__(name: str) -> Any:
    module = _KEYSET_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module 'kustody.client' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "DataKeyRef",
    "DecryptionFailed",
    "InvalidKeyset",
    "Keyset",
    "KeysetError",
    "KeysetUnreadable",
    "MalformedCiphertext",
    "MessageTooLarge",
    "Reason",
    "UnknownKeyId",
    "UnwrapClient",
    "UnwrapError",
    "Unwrapped",
    "WrappedKey",
    "default_client",
    "read_secret_dir",
    "unwrap",
]
