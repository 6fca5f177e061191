"""The mounted DataKey Secret: the wrapped key and the binding it was sealed with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kustody.client.errors import Reason, UnwrapError

WRAPPED_KEY = "wrapped-key"
ENCRYPTION_CONTEXT = "encryption-context"
_MAX_FILE_BYTES = 64 * 1024


@dataclass(frozen=True)
class WrappedKey:
    """Everything the sidecar needs to unwrap one DEK; no secret in it (the envelope is
    ciphertext). Hashable, so it keys the client's cache."""

    wrapped: str
    key_ring: str
    namespace: str
    data_key: str
    encryption_context: tuple[tuple[str, str], ...] = field(default=())

    @property
    def context(self) -> dict[str, str]:
        return dict(self.encryption_context)

    @classmethod
    def of(
        cls,
        wrapped: str,
        key_ring: str,
        namespace: str,
        data_key: str,
        encryption_context: Mapping[str, str] | None = None,
    ) -> WrappedKey:
        return cls(
            wrapped,
            key_ring,
            namespace,
            data_key,
            tuple(sorted((encryption_context or {}).items())),
        )


def _read(path: Path) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(_MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UnwrapError(
            Reason.SECRET_UNREADABLE, f"cannot read {path}: {exc.strerror or exc}"
        ) from None
    if len(raw) > _MAX_FILE_BYTES:
        raise UnwrapError(Reason.SECRET_UNREADABLE, f"{path} is larger than {_MAX_FILE_BYTES} B")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise UnwrapError(Reason.SECRET_UNREADABLE, f"{path} is not UTF-8 text") from None


def read_secret_dir(
    directory: str | Path,
    *,
    wrapped_key: str = WRAPPED_KEY,
    encryption_context: str = ENCRYPTION_CONTEXT,
) -> WrappedKey:
    """Read a DataKey Secret mounted as files (the entry names follow spec.template.keys)."""
    base = Path(directory)
    wrapped = _read(base / wrapped_key)
    try:
        doc = json.loads(_read(base / encryption_context))
        ring, namespace, name = doc["keyRing"], doc["namespace"], doc["dataKey"]
        context = doc.get("encryptionContext") or {}
        if not all(isinstance(v, str) for v in (ring, namespace, name)) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in dict(context).items()
        ):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnwrapError(
            Reason.SECRET_UNREADABLE,
            f"{base / encryption_context} is not a Kustody encryption-context document "
            "(JSON with keyRing, namespace, dataKey, encryptionContext)",
        ) from None
    return WrappedKey.of(wrapped, ring, namespace, name, context)
