"""Typed views of the three custom resources' specs, with the defaults the operator applies.

The CRDs declare no ``default:`` (so a Git copy and the live object stay identical); the
defaults documented in the schema descriptions live here, once.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kustody.domain.duration import parse_duration
from kustody.domain.errors import DomainError, InvalidSpec
from kustody.domain.keyset import DEFAULT_REMOVAL_DELAY, Retention

DEFAULT_DEK_LENGTH = 32
DEFAULT_DESTROY_AFTER = dt.timedelta(hours=720)
ROTATE_ANNOTATION = "kustody.io/rotate-requested-at"
RESTORE_ANNOTATION = "kustody.io/restore-versions"
REWRAP_ANNOTATION = "kustody.io/rewrap-requested-at"


def parse_restore_request(value: str) -> frozenset[int]:
    """``"1,3@2026-11-29T10:00:00Z"`` → {1, 3}; the part after "@" makes a request unique.

    Raises ValueError for anything else, so a typo is reported rather than half-applied."""
    versions = value.split("@", 1)[0]
    parsed = frozenset(int(v.strip().lstrip("v")) for v in versions.split(",") if v.strip())
    if not parsed or min(parsed) < 1:
        raise ValueError(f"{value[:64]!r} names no versions (expected e.g. '1,3@<timestamp>')")
    return parsed


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


class Rewrap(enum.StrEnum):
    AUTOMATIC = "Automatic"
    MANUAL = "Manual"


class DeletionPolicy(enum.StrEnum):
    RETAIN = "Retain"
    DESTROY = "Destroy"


def _map(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _spec(value: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidSpec("spec is required")
    return value


def _required(raw: Mapping[str, Any], key: str, path: str) -> str:
    value = raw.get(key)
    if value is None or value == "":
        raise InvalidSpec(f"{path} is required")
    return str(value)


def _duration(raw: Mapping[str, Any], key: str, path: str) -> dt.timedelta:
    try:
        return parse_duration(str(raw[key]))
    except DomainError as exc:
        raise InvalidSpec(f"{path}: {exc}") from None


@dataclass(frozen=True)
class MaintenanceWindow:
    """Weekly windows in UTC: ``days`` (0 = Monday), opening at ``start`` for ``length``."""

    days: frozenset[int]
    start: dt.time
    length: dt.timedelta

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> MaintenanceWindow:
        days = frozenset(_DAYS.index(d) for d in raw.get("days") or _DAYS if d in _DAYS)
        hour, minute = (int(x) for x in str(raw.get("start", "00:00")).split(":"))
        return cls(days, dt.time(hour, minute), parse_duration(str(raw.get("duration", "24h"))))


@dataclass(frozen=True)
class RotationPolicySpec:
    rotation_period: dt.timedelta
    retire_after: dt.timedelta | None
    destroy_after: dt.timedelta
    rewrap: Rewrap
    window: MaintenanceWindow | None

    @classmethod
    def parse(cls, raw: Any) -> RotationPolicySpec:
        spec = _spec(raw)
        _required(spec, "rotationPeriod", "spec.rotationPeriod")
        window = spec.get("maintenanceWindow")
        try:
            rewrap = Rewrap(spec.get("rewrap") or Rewrap.AUTOMATIC)
            parsed_window = MaintenanceWindow.parse(window) if isinstance(window, Mapping) else None
        except (ValueError, TypeError):
            raise InvalidSpec(
                "spec.rewrap must be Automatic or Manual and spec.maintenanceWindow must have "
                "days, start (HH:MM) and duration"
            ) from None
        return cls(
            rotation_period=_duration(spec, "rotationPeriod", "spec.rotationPeriod"),
            retire_after=(
                _duration(spec, "retireAfter", "spec.retireAfter")
                if spec.get("retireAfter") is not None
                else None
            ),
            destroy_after=(
                _duration(spec, "destroyAfter", "spec.destroyAfter")
                if spec.get("destroyAfter")
                else DEFAULT_DESTROY_AFTER
            ),
            rewrap=rewrap,
            window=parsed_window,
        )


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    operator: str
    values: frozenset[str]

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.operator == "In":
            return labels.get(self.key) in self.values
        if self.operator == "NotIn":
            return self.key not in labels or labels[self.key] not in self.values
        if self.operator == "Exists":
            return self.key in labels
        if self.operator == "DoesNotExist":
            return self.key not in labels
        return False


@dataclass(frozen=True)
class NamespaceSelector:
    """KeyRing ``allowedNamespaces``: listed names, or a label selector over Namespaces."""

    names: frozenset[str] = frozenset()
    match_labels: Mapping[str, str] | None = None
    match_expressions: tuple[LabelRequirement, ...] = ()
    has_selector: bool = False

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> NamespaceSelector:
        selector = raw.get("selector")
        if not isinstance(selector, Mapping):
            return cls(names=frozenset(raw.get("names") or ()))
        return cls(
            names=frozenset(raw.get("names") or ()),
            match_labels=dict(_map(selector.get("matchLabels"))),
            match_expressions=tuple(
                LabelRequirement(e["key"], e["operator"], frozenset(e.get("values") or ()))
                for e in selector.get("matchExpressions") or ()
            ),
            has_selector=True,
        )

    @property
    def needs_labels(self) -> bool:
        return self.has_selector

    def allows(self, namespace: str, labels: Mapping[str, str] | None) -> bool:
        """Whether ``namespace`` (with ``labels``, None if unknown) may use the KeyRing."""
        if namespace in self.names:
            return True
        if not self.has_selector or labels is None:
            return False
        if any(labels.get(k) != v for k, v in (self.match_labels or {}).items()):
            return False
        return all(req.matches(labels) for req in self.match_expressions)


@dataclass(frozen=True)
class KeyRingSpec:
    provider: str
    policy_name: str | None
    allowed: NamespaceSelector
    allow_plaintext_export: bool
    deletion_policy: DeletionPolicy
    escrow: bool = False  # spec.escrow is set: new versions are created escrowable

    @classmethod
    def parse(cls, raw: Any) -> KeyRingSpec:
        spec = _spec(raw)
        _required(spec, "algorithm", "spec.algorithm")
        try:
            deletion = DeletionPolicy(spec.get("deletionPolicy") or DeletionPolicy.RETAIN)
        except ValueError:
            raise InvalidSpec("spec.deletionPolicy must be Retain or Destroy") from None
        try:
            allowed = NamespaceSelector.parse(_map(spec.get("allowedNamespaces")))
        except (KeyError, TypeError):
            raise InvalidSpec(
                "each of spec.allowedNamespaces.selector.matchExpressions needs a key and an "
                "operator"
            ) from None
        return cls(
            provider=str(_map(spec.get("provider")).get("name") or "default"),
            policy_name=_map(spec.get("rotationPolicyRef")).get("name"),
            allowed=allowed,
            allow_plaintext_export=bool(spec.get("allowPlaintextExport", False)),
            deletion_policy=deletion,
            escrow=bool(spec.get("escrow")),
        )


@dataclass(frozen=True)
class SecretKeys:
    """Names of the entries in the DataKey's Secret."""

    wrapped_key: str = "wrapped-key"
    key_ring: str = "key-ring"
    version: str = "key-version"
    context: str = "encryption-context"
    plaintext: str = "plaintext-key"
    keyset: str = "keyset"

    @classmethod
    def parse(cls, raw: Mapping[str, Any]) -> SecretKeys:
        d = cls()
        return cls(
            wrapped_key=raw.get("wrappedKey") or d.wrapped_key,
            key_ring=raw.get("keyRing") or d.key_ring,
            version=raw.get("version") or d.version,
            context=raw.get("context") or d.context,
            plaintext=raw.get("plaintext") or d.plaintext,
            keyset=raw.get("keyset") or d.keyset,
        )


@dataclass(frozen=True)
class RestartTarget:
    kind: str
    name: str


@dataclass(frozen=True)
class DataKeySpec:
    key_ring: str
    secret_name: str
    length: int
    encryption_context: Mapping[str, str]
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    keys: SecretKeys
    regenerate_after: dt.timedelta | None
    restart_targets: tuple[RestartTarget, ...]
    expose_plaintext: bool
    consumers: tuple[str, ...] = field(default=())
    retention: Retention = field(default_factory=Retention)

    @classmethod
    def parse(cls, raw: Any) -> DataKeySpec:
        spec = _spec(raw)
        template = _map(spec.get("template"))
        metadata = _map(template.get("metadata"))
        regen = spec.get("regenerateAfter")
        targets = spec.get("rolloutRestartTargets") or ()
        if not all(isinstance(t, Mapping) and t.get("kind") and t.get("name") for t in targets):
            raise InvalidSpec("each of spec.rolloutRestartTargets needs a kind and a name")
        try:
            length = int(spec.get("length") or DEFAULT_DEK_LENGTH)
        except (TypeError, ValueError):
            raise InvalidSpec("spec.length must be a number of bytes (16 to 64)") from None
        return cls(
            key_ring=_required(_map(spec.get("keyRingRef")), "name", "spec.keyRingRef.name"),
            secret_name=_required(spec, "secretName", "spec.secretName"),
            length=length,
            encryption_context=dict(_map(spec.get("encryptionContext"))),
            labels=dict(_map(metadata.get("labels"))),
            annotations=dict(_map(metadata.get("annotations"))),
            keys=SecretKeys.parse(_map(template.get("keys"))),
            regenerate_after=(
                _duration(spec, "regenerateAfter", "spec.regenerateAfter") if regen else None
            ),
            restart_targets=tuple(RestartTarget(str(t["kind"]), str(t["name"])) for t in targets),
            expose_plaintext=bool(spec.get("exposePlaintext", False)),
            consumers=tuple(spec.get("consumers") or ()),
            retention=_retention(_map(spec.get("retention"))),
        )


def _retention(raw: Mapping[str, Any]) -> Retention:
    keep = raw.get("keepGenerations")
    try:
        keep_generations = int(keep) if keep is not None else None
    except (TypeError, ValueError):
        raise InvalidSpec("spec.retention.keepGenerations must be a whole number") from None
    if keep_generations is not None and keep_generations < 1:
        raise InvalidSpec("spec.retention.keepGenerations must be at least 1 (the primary)")
    return Retention(
        keep_generations=keep_generations,
        keep_for=(
            _duration(raw, "keepFor", "spec.retention.keepFor") if raw.get("keepFor") else None
        ),
        removal_delay=(
            _duration(raw, "removalDelay", "spec.retention.removalDelay")
            if raw.get("removalDelay")
            else DEFAULT_REMOVAL_DELAY
        ),
    )
