"""The mounted DataKey Secret: the wrapped key and the binding it was sealed with."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kustody.client.errors import Reason, UnwrapError

WRAPPED_KEY = "wrapped-key"
ENCRYPTION_CONTEXT = "encryption-context"
KEYSET = "keyset"
WRAPPED_KEYSET_FORMAT = "kustody.io/wrapped-keyset/v1"
_MAX_FILE_BYTES = 64 * 1024
_MAX_KEYSET_BYTES = 1024 * 1024


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


@dataclass(frozen=True)
class WrappedGeneration:
    """One entry of the Secret's keyset: a generation's wrapped DEK and its key id."""

    key_id: int
    generation: int
    primary: bool
    wrapped: str


@dataclass(frozen=True)
class WrappedKeyset:
    """The DataKey's whole keyset as the Secret publishes it: every generation wrapped."""

    key: WrappedKey  # the primary, with the binding
    generations: tuple[WrappedGeneration, ...]


def _read(path: Path, limit: int = _MAX_FILE_BYTES) -> str:
    try:
        with path.open("rb") as fh:
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise UnwrapError(
            Reason.SECRET_UNREADABLE, f"cannot read {path}: {exc.strerror or exc}"
        ) from None
    if len(raw) > limit:
        raise UnwrapError(Reason.SECRET_UNREADABLE, f"{path} is larger than {limit} B")
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


def read_keyset_dir(
    directory: str | Path,
    *,
    keyset: str = KEYSET,
    wrapped_key: str = WRAPPED_KEY,
    encryption_context: str = ENCRYPTION_CONTEXT,
) -> WrappedKeyset | None:
    """The keyset a mounted DataKey Secret publishes, or None when it has no keyset entry
    (a Secret written before DataKeys had generations: only ``wrapped-key``)."""
    base = Path(directory)
    key = read_secret_dir(base, wrapped_key=wrapped_key, encryption_context=encryption_context)
    if not (base / keyset).exists():
        return None
    path = base / keyset
    try:
        doc = json.loads(_read(path, _MAX_KEYSET_BYTES))
        if doc.get("format") != WRAPPED_KEYSET_FORMAT:
            raise ValueError
        generations = tuple(
            WrappedGeneration(
                key_id=int(k["keyId"]),
                generation=int(k["generation"]),
                primary=k["status"] == "Primary",
                wrapped=str(k["wrappedKey"]),
            )
            for k in doc["keys"]
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnwrapError(
            Reason.SECRET_UNREADABLE,
            f"{path} is not a Kustody keyset document ({WRAPPED_KEYSET_FORMAT})",
        ) from None
    if sum(1 for g in generations if g.primary) != 1:
        raise UnwrapError(Reason.SECRET_UNREADABLE, f"{path} must name exactly one primary")
    return WrappedKeyset(key, generations)
