"""The Secret a DataKey publishes: which entries, labels and annotations it has."""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping
from dataclasses import dataclass

from kustody.domain.specs import DataKeySpec

MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGER = "kustody"
LABEL_DATAKEY = "kustody.io/datakey"
LABEL_KEYRING = "kustody.io/keyring"
LABEL_VERSION = "kustody.io/keyring-version"
ANNOTATION_GENERATION = "kustody.io/dek-generation"
SECRET_TYPE = "kustody.io/wrapped-key"  # noqa: S105 - a Secret type, not a password


@dataclass(frozen=True)
class SecretContent:
    """Desired labels, annotations and ``data`` (already base64, as the API stores it)."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    data: Mapping[str, str]


def _b64(value: bytes | str) -> str:
    raw = value.encode() if isinstance(value, str) else value
    return base64.b64encode(raw).decode("ascii")


def context_document(namespace: str, name: str, spec: DataKeySpec) -> str:
    """What a workload needs, besides the envelope, to unwrap: the AAD binding, as JSON."""
    return json.dumps(
        {
            "keyRing": spec.key_ring,
            "namespace": namespace,
            "dataKey": name,
            "encryptionContext": dict(sorted(spec.encryption_context.items())),
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def render(
    namespace: str,
    name: str,
    spec: DataKeySpec,
    *,
    wrapped: str,
    version: int,
    generation: int,
    plaintext: bytes | None = None,
    keyset: str | None = None,
) -> SecretContent:
    """``wrapped``/``version``/``generation`` are the primary generation's (the entries
    single-key consumers read); ``keyset`` is the whole keyset document, all wrapped."""
    keys = spec.keys
    data = {
        keys.wrapped_key: _b64(wrapped),
        keys.key_ring: _b64(spec.key_ring),
        keys.version: _b64(str(version)),
        keys.context: _b64(context_document(namespace, name, spec)),
    }
    if keyset is not None:
        data[keys.keyset] = _b64(keyset)
    if plaintext is not None:
        data[keys.plaintext] = _b64(plaintext)
    labels = {
        **spec.labels,
        MANAGED_BY: MANAGER,
        LABEL_DATAKEY: name,
        LABEL_KEYRING: spec.key_ring,
        LABEL_VERSION: str(version),
    }
    annotations = {**spec.annotations, ANNOTATION_GENERATION: str(generation)}
    return SecretContent(labels, annotations, data)


def differs(desired: SecretContent, live: Mapping[str, object]) -> bool:
    """Whether the live Secret lacks anything desired (extra labels others add are fine)."""
    meta = live.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    live_labels = meta.get("labels") or {}
    live_annotations = meta.get("annotations") or {}
    live_data = live.get("data") or {}
    assert isinstance(live_labels, Mapping)
    assert isinstance(live_annotations, Mapping)
    assert isinstance(live_data, Mapping)
    return (
        any(live_labels.get(k) != v for k, v in desired.labels.items())
        or any(live_annotations.get(k) != v for k, v in desired.annotations.items())
        or dict(live_data) != dict(desired.data)
    )
