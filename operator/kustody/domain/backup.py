"""The DataKey backup: every DataKey's wrapped keyset, safe to store because all of it is wrapped.

A cluster rebuilt from Git re-creates each DataKey without its status; without this file (or the
old Secrets) each would get a *new* DEK and data encrypted under the old ones would be lost.
``kustody backup export`` writes one document (``kustody.io/backup/v1``, JSON):

    {"format": "kustody.io/backup/v1", "createdAt": "...",
     "keyRings": [{"name": ..., "versions": [{"version": 1, "fingerprint": ...}, ...]}],
     "dataKeys": [{"namespace": ..., "name": ..., "uid": ..., "keyRing": ...,
                   "secretName": ..., "spec": {...},
                   "generations": [<status.generations entries: keyId, wrappedKey, ...>]}]}

It holds declarations (a DataKey's spec), KEK fingerprints (public) and wrapped DEKs, which only
the token's KEKs open, bound to their DataKey's namespace, name and encryption context. It never
holds a plaintext DEK, even of a DataKey that exposes one: it is built from the status, never
from a Secret. ``kustody backup restore`` writes each entry back as the DataKey's Secret (no
owner); the re-created DataKey adopts it after the sidecar has verified every wrapped key.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from kustody.domain import keyset
from kustody.domain.errors import InvalidSpec
from kustody.domain.secret import SECRET_TYPE, SecretContent, render
from kustody.domain.specs import DataKeySpec
from kustody.domain.timestamps import format_time

BACKUP_FORMAT = "kustody.io/backup/v1"
# Set on the Secrets a restore writes; the adopting DataKey removes it.
ANNOTATION_RESTORED = "kustody.io/restored-from-backup"


class BackupError(ValueError):
    """A backup document that cannot be used; the message says where."""


@dataclass(frozen=True)
class Entry:
    """One DataKey of a backup."""

    namespace: str
    name: str
    uid: str
    key_ring: str
    secret_name: str
    spec: Mapping[str, Any]
    generations: tuple[keyset.Generation, ...]

    @property
    def key_ids(self) -> frozenset[int]:
        return frozenset(g.key_id for g in self.generations)


def build(
    datakeys: Iterable[Mapping[str, Any]],
    keyrings: Iterable[Mapping[str, Any]],
    now: dt.datetime,
) -> tuple[dict[str, Any], list[str]]:
    """The backup document and the DataKeys left out (``ns/name: why``)."""
    skipped: list[str] = []
    entries: list[dict[str, Any]] = []
    for dk in sorted(datakeys, key=lambda d: (d["metadata"]["namespace"], d["metadata"]["name"])):
        meta, spec = dk["metadata"], dk.get("spec") or {}
        where = f"{meta['namespace']}/{meta['name']}"
        generations = keyset.from_status(dk.get("status") or {}, meta["uid"])
        if not generations:
            skipped.append(f"{where}: no key material yet")
            continue
        entries.append(
            {
                "namespace": meta["namespace"],
                "name": meta["name"],
                "uid": meta["uid"],
                "keyRing": (spec.get("keyRingRef") or {}).get("name"),
                "secretName": spec.get("secretName"),
                "spec": spec,
                "generations": keyset.to_status(generations),
            }
        )
    rings = [
        {
            "name": kr["metadata"]["name"],
            "versions": [
                {"version": v.get("version"), "fingerprint": v.get("fingerprint")}
                for v in (kr.get("status") or {}).get("versions") or ()
            ],
        }
        for kr in sorted(keyrings, key=lambda k: k["metadata"]["name"])
    ]
    document = {
        "format": BACKUP_FORMAT,
        "createdAt": format_time(now),
        "keyRings": rings,
        "dataKeys": entries,
    }
    return document, skipped


def parse(text: str | bytes) -> list[Entry]:
    """The entries of a backup document; strict (a damaged file restores nothing)."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise BackupError("not a JSON document") from None
    if not isinstance(doc, dict) or doc.get("format") != BACKUP_FORMAT:
        raise BackupError(f"not a {BACKUP_FORMAT} document")
    raw = doc.get("dataKeys")
    if not isinstance(raw, list):
        raise BackupError("dataKeys is missing")
    out: list[Entry] = []
    for i, item in enumerate(raw):
        where = f"dataKeys[{i}]"
        try:
            spec = item["spec"]
            DataKeySpec.parse(spec)
            generations = tuple(keyset.Generation.from_status(g) for g in item["generations"])
            entry = Entry(
                str(item["namespace"]),
                str(item["name"]),
                str(item["uid"]),
                str(item["keyRing"]),
                str(item["secretName"]),
                spec,
                tuple(sorted(generations, key=lambda g: g.generation)),
            )
        except (KeyError, TypeError, ValueError, InvalidSpec) as exc:
            raise BackupError(f"{where} cannot be read: {exc}") from None
        if not entry.generations or keyset.primary(entry.generations) is None:
            raise BackupError(f"{where} ({entry.namespace}/{entry.name}) has no primary key")
        if len(entry.key_ids) != len(entry.generations):
            raise BackupError(f"{where} ({entry.namespace}/{entry.name}) repeats a key id")
        out.append(entry)
    return out


def secret_for(entry: Entry, created_at: str) -> dict[str, Any]:
    """The Secret a restore writes for ``entry``: what the operator would publish (without
    any plaintext entry), no ownerReference (the re-created DataKey adopts it)."""
    spec = DataKeySpec.parse(entry.spec)
    current = keyset.primary(entry.generations)
    assert current is not None  # parse() checked
    content: SecretContent = render(
        entry.namespace,
        entry.name,
        spec,
        wrapped=current.wrapped,
        version=current.version,
        generation=current.generation,
        keyset=keyset.wrapped_keyset_document(entry.generations),
    )
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": SECRET_TYPE,
        "metadata": {
            "name": entry.secret_name,
            "namespace": entry.namespace,
            "labels": dict(content.labels),
            "annotations": {**content.annotations, ANNOTATION_RESTORED: created_at},
        },
        "data": dict(content.data),
    }
