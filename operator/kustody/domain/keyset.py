"""A DataKey's generations: every DEK it ever had that data may still need.

Regeneration (``spec.regenerateAfter``) makes new key material; the earlier generations stay
in the keyset, decrypt-only, so data encrypted under them stays readable ("no key, no data").
A generation leaves only through a staged removal that ``spec.retention`` asks for, with a
waiting period shown in the status and cancellable until it ends; without ``retention``
nothing is ever removed. Each generation has a stable key id that workloads put in every
ciphertext (``kustody.client`` keysets), so decryption picks the right generation.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kustody.domain.timestamps import format_time, parse_time

KEYSET_FORMAT = "kustody.io/wrapped-keyset/v1"
DEFAULT_REMOVAL_DELAY = dt.timedelta(hours=168)
KEEP_ANNOTATION = "kustody.io/keep-generations"
# Set (to the current time) by `kustody datakey regenerate`: new key material now, once per value.
REGENERATE_ANNOTATION = "kustody.io/regenerate-requested-at"


class GenerationState(enum.StrEnum):
    PRIMARY = "Primary"
    DECRYPT_ONLY = "DecryptOnly"
    REMOVAL_SCHEDULED = "RemovalScheduled"


def key_id_for(uid: str, generation: int, taken: Iterable[int] = ()) -> int:
    """A stable 32-bit key id: the same DataKey generation always gets the same id, and a
    re-created DataKey (a new uid) gets different ones. ``taken``: ids already in the keyset
    (generations adopted from a backup keep the ids of the DataKey that made them), which a
    new id must not repeat."""
    used = set(taken)
    attempt = 0
    while True:
        seed = f"{uid}/{generation}" if attempt == 0 else f"{uid}/{generation}/{attempt}"
        key_id = int.from_bytes(hashlib.sha256(seed.encode()).digest()[:4], "big")
        if key_id not in used:
            return key_id
        attempt += 1


@dataclass(frozen=True)
class Generation:
    """One entry of DataKey ``status.generations``."""

    generation: int
    key_id: int
    wrapped: str
    version: int  # the KeyRing version the DEK is wrapped under
    state: GenerationState
    created_at: dt.datetime
    superseded_at: dt.datetime | None = None
    remove_at: dt.datetime | None = None

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> Generation:
        return cls(
            generation=int(raw["generation"]),
            key_id=int(raw["keyId"]),
            wrapped=str(raw["wrappedKey"]),
            version=int(raw["keyRingVersion"]),
            state=GenerationState(raw.get("state", GenerationState.DECRYPT_ONLY)),
            created_at=parse_time(raw.get("createdAt")) or dt.datetime.fromtimestamp(0, dt.UTC),
            superseded_at=parse_time(raw.get("supersededAt")),
            remove_at=parse_time(raw.get("removeAt")),
        )

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "generation": self.generation,
            "keyId": self.key_id,
            "state": str(self.state),
            "wrappedKey": self.wrapped,
            "keyRingVersion": self.version,
            "createdAt": format_time(self.created_at),
        }
        if self.superseded_at is not None:
            out["supersededAt"] = format_time(self.superseded_at)
        if self.remove_at is not None:
            out["removeAt"] = format_time(self.remove_at)
        return out


def from_status(status: Mapping[str, Any], uid: str) -> list[Generation]:
    """The generations a DataKey status records. A status written before generations existed
    (one ``wrappedKey``) is adopted as its current generation, the same DEK, as Primary."""
    raw = status.get("generations")
    if isinstance(raw, list) and raw:
        return sorted((Generation.from_status(g) for g in raw), key=lambda g: g.generation)
    wrapped = status.get("wrappedKey")
    if not wrapped:
        return []
    number = int(status.get("dekGeneration") or 1)
    created = parse_time(status.get("lastGeneratedAt")) or dt.datetime.fromtimestamp(0, dt.UTC)
    return [
        Generation(
            generation=number,
            key_id=key_id_for(uid, number),
            wrapped=str(wrapped),
            version=int(status.get("keyRingVersion") or 0),
            state=GenerationState.PRIMARY,
            created_at=created,
        )
    ]


def to_status(generations: Sequence[Generation]) -> list[dict[str, Any]]:
    return [g.to_status() for g in sorted(generations, key=lambda g: g.generation)]


def primary(generations: Sequence[Generation]) -> Generation | None:
    found = [g for g in generations if g.state is GenerationState.PRIMARY]
    return max(found, key=lambda g: g.generation) if found else None


def add_generation(
    generations: Sequence[Generation],
    *,
    uid: str,
    wrapped: str,
    version: int,
    now: dt.datetime,
) -> list[Generation]:
    """A regeneration: the new DEK becomes Primary, the previous Primary decrypt-only."""
    number = max((g.generation for g in generations), default=0) + 1
    kept = [
        replace(g, state=GenerationState.DECRYPT_ONLY, superseded_at=now)
        if g.state is GenerationState.PRIMARY
        else g
        for g in generations
    ]
    key_id = key_id_for(uid, number, (g.key_id for g in generations))
    new = Generation(number, key_id, wrapped, version, GenerationState.PRIMARY, now)
    return [*kept, new]


def versions_in_use(generations: Iterable[Generation]) -> set[int]:
    """KeyRing versions that still wrap a generation: none may be disabled or destroyed."""
    return {g.version for g in generations if g.version}


@dataclass(frozen=True)
class Retention:
    """``spec.retention``: which decrypt-only generations may be removed, and how slowly."""

    keep_generations: int | None = None  # the primary counts
    keep_for: dt.timedelta | None = None  # after a generation was superseded
    removal_delay: dt.timedelta = DEFAULT_REMOVAL_DELAY

    @property
    def configured(self) -> bool:
        return self.keep_generations is not None or self.keep_for is not None


@dataclass(frozen=True)
class Change:
    """One staged-removal step, for Events: what happened to which generation."""

    kind: str  # RemovalScheduled | RemovalCancelled | Removed
    generation: Generation


def parse_keep(value: str | None) -> frozenset[int]:
    """``kustody.io/keep-generations: "1,3"`` → {1, 3}; garbage keeps nothing extra."""
    if not value:
        return frozenset()
    out: set[int] = set()
    for part in value.split(","):
        part = part.strip()
        if part.isdigit() and int(part) > 0:
            out.add(int(part))
    return frozenset(out)


def _removal_due(g: Generation, rank: int, retention: Retention, now: dt.datetime) -> bool:
    """Whether retention no longer keeps ``g`` (rank 1 = newest decrypt-only)."""
    if retention.keep_generations is not None and rank + 1 > retention.keep_generations:
        return True
    return (
        retention.keep_for is not None
        and g.superseded_at is not None
        and now >= g.superseded_at + retention.keep_for
    )


def plan_retention(
    generations: Sequence[Generation],
    retention: Retention,
    keep: frozenset[int],
    now: dt.datetime,
) -> tuple[list[Generation], list[Change], dt.datetime | None]:
    """Staged removal: (generations after this pass, what changed, when to look again).

    A decrypt-only generation that retention no longer keeps is scheduled for removal
    (``removeAt`` = now + removal delay); it is removed when that time has come and it is
    still not kept. One named in ``keep`` (the CLI's cancellation), or kept again by a
    changed retention, goes back to DecryptOnly. The primary is never touched, and without
    ``retention`` nothing is scheduled at all."""
    out: list[Generation] = []
    changes: list[Change] = []
    due: list[dt.datetime] = []
    older = sorted(
        (g for g in generations if g.state is not GenerationState.PRIMARY),
        key=lambda g: g.generation,
        reverse=True,
    )
    rank = {g.generation: i + 1 for i, g in enumerate(older)}
    for g in sorted(generations, key=lambda g: g.generation):
        if g.state is GenerationState.PRIMARY:
            out.append(g)
            continue
        wanted_gone = (
            retention.configured
            and g.generation not in keep
            and _removal_due(g, rank[g.generation], retention, now)
        )
        if g.state is GenerationState.REMOVAL_SCHEDULED and not wanted_gone:
            back = replace(g, state=GenerationState.DECRYPT_ONLY, remove_at=None)
            changes.append(Change("RemovalCancelled", back))
            out.append(back)
        elif g.state is GenerationState.REMOVAL_SCHEDULED:
            remove_at = g.remove_at or now + retention.removal_delay
            if now >= remove_at:
                changes.append(Change("Removed", g))
                continue
            out.append(replace(g, remove_at=remove_at))
            due.append(remove_at)
        elif wanted_gone:
            scheduled = replace(
                g,
                state=GenerationState.REMOVAL_SCHEDULED,
                remove_at=now + retention.removal_delay,
            )
            changes.append(Change("RemovalScheduled", scheduled))
            out.append(scheduled)
            due.append(now + retention.removal_delay)
        else:
            out.append(g)
            if (
                retention.keep_for is not None
                and g.superseded_at is not None
                and g.generation not in keep
            ):
                due.append(g.superseded_at + retention.keep_for)
    return out, changes, (min(due) if due else None)


def wrapped_keyset_document(generations: Sequence[Generation]) -> str:
    """The Secret entry that publishes the whole keyset (wrapped keys only), as JSON."""
    current = primary(generations)
    return json.dumps(
        {
            "format": KEYSET_FORMAT,
            "primaryKeyId": current.key_id if current else None,
            "keys": [
                {
                    "keyId": g.key_id,
                    "generation": g.generation,
                    "status": ("Primary" if g.state is GenerationState.PRIMARY else "DecryptOnly"),
                    "keyRingVersion": g.version,
                    "wrappedKey": g.wrapped,
                }
                for g in sorted(generations, key=lambda g: g.generation)
            ],
        },
        sort_keys=True,
        separators=(",", ":"),
    )


class KeysetDocumentError(ValueError):
    """A Secret's keyset entry that is not a wrapped keyset Kustody wrote."""


def parse_keyset_document(text: str | bytes, now: dt.datetime) -> list[Generation]:
    """The generations a published keyset entry (:func:`wrapped_keyset_document`) holds, for
    adoption by a re-created DataKey. Key ids, generation numbers and states are carried over
    unchanged, so ciphertexts made before a rebuild name keys the keyset still has; the
    times, which the document does not carry, become ``now`` (a retention period therefore
    starts again at adoption: later, never earlier). Strict: anything unexpected is a
    :class:`KeysetDocumentError`, and nothing is adopted."""
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise KeysetDocumentError("the keyset entry is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != KEYSET_FORMAT:
        raise KeysetDocumentError(f"the keyset entry is not a {KEYSET_FORMAT} document")
    keys = doc.get("keys")
    if not isinstance(keys, list) or not keys:
        raise KeysetDocumentError("the keyset entry holds no keys")
    out: list[Generation] = []
    for entry in keys:
        if not isinstance(entry, dict):
            raise KeysetDocumentError("a keyset entry key is not an object")
        try:
            generation = entry["generation"]
            key_id = entry["keyId"]
            version = entry["keyRingVersion"]
            wrapped = entry["wrappedKey"]
            status = entry["status"]
        except KeyError as exc:
            raise KeysetDocumentError(f"a key of the keyset lacks {exc.args[0]}") from None
        ints = (generation, key_id, version)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints):
            raise KeysetDocumentError("generation, keyId and keyRingVersion must be integers")
        if not (generation > 0 and 0 <= key_id < 2**32 and version > 0):
            raise KeysetDocumentError("generation, keyId or keyRingVersion out of range")
        if not isinstance(wrapped, str) or status not in ("Primary", "DecryptOnly"):
            raise KeysetDocumentError("a key of the keyset has a bad wrappedKey or status")
        state = GenerationState.PRIMARY if status == "Primary" else GenerationState.DECRYPT_ONLY
        superseded = None if state is GenerationState.PRIMARY else now
        out.append(Generation(generation, key_id, wrapped, version, state, now, superseded))
    if len({g.generation for g in out}) != len(out) or len({g.key_id for g in out}) != len(out):
        raise KeysetDocumentError("the keyset repeats a generation or a key id")
    if sum(g.state is GenerationState.PRIMARY for g in out) != 1:
        raise KeysetDocumentError("the keyset must have exactly one primary key")
    if doc.get("primaryKeyId") != next(g.key_id for g in out if g.state is GenerationState.PRIMARY):
        raise KeysetDocumentError("primaryKeyId does not name the primary key")
    return sorted(out, key=lambda g: g.generation)
