"""KEK versions: naming inside the token, states and the primary version.

A KEK version is one AES-256 token object per (KeyRing, version). Its label and ID are derived
from the pair alone, so whoever creates it again finds the same object instead of a second one.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass

from kustody.domain.errors import InvalidArgument

LABEL_PREFIX = "kustody:"
MAX_VERSION = 2**32 - 1
# The shortest time a KEK version stays DESTROY_SCHEDULED before the HSM sidecar destroys it
# (the clouds' minimum; the sidecar's --min-destroy-delay lowers it for tests only).
DEFAULT_MIN_DESTROY_DELAY_SECONDS = 24 * 3600.0
# A KeyRing is a cluster-scoped object: its name is a DNS-1123 subdomain.
_KEY_RING = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"kustody:(?P<ring>[a-z0-9.-]{1,253}):v(?P<version>[1-9][0-9]{0,9})")


class VersionState(enum.StrEnum):
    ENABLED = "ENABLED"
    DISABLED = "DISABLED"
    # Disabled, and the token records since when its destruction is scheduled: DestroyVersion
    # is accepted only once it has been in this state for the sidecar's minimum waiting period.
    DESTROY_SCHEDULED = "DESTROY_SCHEDULED"
    DESTROYED = "DESTROYED"


# The states SetVersionState may ask for (DESTROYED only by DestroyVersion).
SETTABLE_STATES = frozenset(
    {VersionState.ENABLED, VersionState.DISABLED, VersionState.DESTROY_SCHEDULED}
)


def settable(state: VersionState | None) -> VersionState:
    """``state`` if SetVersionState may ask for it, else InvalidArgument."""
    if state is None or state not in SETTABLE_STATES:
        raise InvalidArgument("the state must be ENABLED, DISABLED or DESTROY_SCHEDULED")
    return state


def validate_key_ring(name: str) -> str:
    if not 0 < len(name) <= 253 or _KEY_RING.fullmatch(name) is None:
        raise InvalidArgument(
            f"KeyRing name {name[:80]!r} is not a DNS-1123 subdomain (lowercase a-z, 0-9, '-', '.')"
        )
    return name


def validate_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise InvalidArgument(f"version {version} is out of range 1..{MAX_VERSION}")
    return version


@dataclass(frozen=True, order=True)
class KeyVersionRef:
    """One KEK version: the pair that names it everywhere."""

    key_ring: str
    version: int

    def __post_init__(self) -> None:
        validate_key_ring(self.key_ring)
        validate_version(self.version)

    @property
    def label(self) -> str:
        """CKA_LABEL of the KEK (and of the tombstone left when it is destroyed)."""
        return f"{LABEL_PREFIX}{self.key_ring}:v{self.version}"

    @property
    def object_id(self) -> bytes:
        """CKA_ID of the KEK: SHA-256 of the label, so it is fixed-size and deterministic."""
        return hashlib.sha256(self.label.encode("ascii")).digest()

    def kms_key_id(self, fingerprint: str) -> str:
        """The KMS v2 key_id: names the KeyRing, the version and the KEK it was created as."""
        return f"{self.key_ring}:v{self.version}:{fingerprint}"

    def __str__(self) -> str:
        return f"{self.key_ring}/v{self.version}"


@dataclass(frozen=True)
class VersionInfo:
    """What may be said about a KEK version in public: never key material."""

    ref: KeyVersionRef
    state: VersionState
    fingerprint: str  # key check value, hex
    # Created (or recovered) for an escrowed KeyRing: extractable only under keys the token's
    # Security Officer admitted. False: never extractable.
    escrowable: bool = False


@dataclass(frozen=True)
class KeyDescription:
    """A KeyRing as the token holds it: its primary version and every version's info."""

    key_ring: str
    primary_version: int | None
    versions: tuple[VersionInfo, ...]


def parse_label(label: str) -> KeyVersionRef | None:
    """The version a token object's label names, or None for labels Kustody did not write."""
    match = _LABEL.fullmatch(label)
    if match is None:
        return None
    try:
        return KeyVersionRef(match["ring"], int(match["version"]))
    except InvalidArgument:
        return None


def primary_version(states: Mapping[int, VersionState]) -> int | None:
    """The version new data keys use by default: the highest ENABLED one."""
    enabled = [v for v, state in states.items() if state is VersionState.ENABLED]
    return max(enabled, default=None)
