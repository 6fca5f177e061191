"""The life of a KeyRing's versions: Enabled → Disabled → DestroyScheduled → Destroyed.

``plan`` is the whole policy as one pure function of the KeyRing's status, its RotationPolicy,
what references each version and the time. It never disables or destroys a version that
something still references (no key, no data):

- a referenced version that is Disabled is brought back to Enabled at once;
- a referenced version in DestroyScheduled keeps its countdown (a deliberate, visible state;
  ``destruction_impact`` reports it), but when the countdown ends it is not destroyed while
  anything still references it;
- versions named in ``restore`` (the ``kustody.io/restore-versions`` annotation) go back to
  Enabled from Disabled or DestroyScheduled: the cancellation of a destruction.

Every step but the last can be undone.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from kustody.domain.schedule import in_window, next_window_start
from kustody.domain.specs import DEFAULT_DESTROY_AFTER, RotationPolicySpec
from kustody.domain.timestamps import format_time, parse_time


class State(enum.StrEnum):
    ENABLED = "Enabled"
    DISABLED = "Disabled"
    DESTROY_SCHEDULED = "DestroyScheduled"
    DESTROYED = "Destroyed"


@dataclass(frozen=True)
class Version:
    """One entry of KeyRing ``status.versions``."""

    version: int
    state: State
    created_at: dt.datetime
    fingerprint: str = ""
    disabled_at: dt.datetime | None = None
    destroy_at: dt.datetime | None = None
    destroyed_at: dt.datetime | None = None
    restored_at: dt.datetime | None = None
    data_keys: int = 0

    @classmethod
    def from_status(cls, raw: Mapping[str, Any]) -> Version:
        return cls(
            version=int(raw["version"]),
            state=State(raw.get("state", State.ENABLED)),
            created_at=parse_time(raw.get("createdAt")) or dt.datetime.fromtimestamp(0, dt.UTC),
            fingerprint=str(raw.get("fingerprint", "")),
            disabled_at=parse_time(raw.get("disabledAt")),
            destroy_at=parse_time(raw.get("destroyAt")),
            destroyed_at=parse_time(raw.get("destroyedAt")),
            restored_at=parse_time(raw.get("restoredAt")),
            data_keys=int(raw.get("dataKeys", 0)),
        )

    def to_status(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version,
            "state": str(self.state),
            "createdAt": format_time(self.created_at),
            "fingerprint": self.fingerprint,
            "dataKeys": self.data_keys,
        }
        for key, value in (
            ("disabledAt", self.disabled_at),
            ("destroyAt", self.destroy_at),
            ("destroyedAt", self.destroyed_at),
            ("restoredAt", self.restored_at),
        ):
            if value is not None:
                out[key] = format_time(value)
        return out


class ActionKind(enum.StrEnum):
    DISABLE = "Disable"
    SCHEDULE_DESTROY = "ScheduleDestroy"
    DESTROY = "Destroy"
    RESTORE = "Restore"


@dataclass(frozen=True)
class Action:
    kind: ActionKind
    version: int
    reason: str


@dataclass(frozen=True)
class References:
    """What still needs each version: DataKeys (by status or Secret) and Secrets."""

    data_keys: Mapping[int, int] = field(default_factory=dict)
    secrets: Mapping[int, int] = field(default_factory=dict)

    def count(self, version: int) -> int:
        return self.data_keys.get(version, 0) + self.secrets.get(version, 0)


def count_references(used: Iterable[tuple[frozenset[int], int | None]]) -> References:
    """References from each DataKey that counts: (every KeyRing version any of its retained
    generations is wrapped under, the version its own Secret is labelled with, if any)."""
    data_keys: dict[int, int] = {}
    secrets: dict[int, int] = {}
    for versions, secret_version in used:
        for v in versions | ({secret_version} if secret_version else set()):
            data_keys[v] = data_keys.get(v, 0) + 1
        if secret_version:
            secrets[secret_version] = secrets.get(secret_version, 0) + 1
    return References(data_keys, secrets)


@dataclass(frozen=True)
class Plan:
    actions: tuple[Action, ...]
    blocked: tuple[tuple[int, str], ...]
    next_due: dt.datetime | None


def superseded_at(versions: Sequence[Version], version: int) -> dt.datetime | None:
    """When ``version`` stopped being the newest: the creation of the next version."""
    later = [v.created_at for v in versions if v.version > version]
    return min(later) if later else None


def plan(
    versions: Sequence[Version],
    primary: int | None,
    policy: RotationPolicySpec | None,
    refs: References,
    now: dt.datetime,
    *,
    deleting: bool = False,
    restore: frozenset[int] = frozenset(),
) -> Plan:
    """The next lifecycle steps that are due now, and when the next one falls due."""
    actions: list[Action] = []
    blocked: list[tuple[int, str]] = []
    due: list[dt.datetime] = []
    retire_after = policy.retire_after if policy else None
    window = policy.window if policy else None
    window_open = in_window(window, now)

    for v in versions:
        used = refs.count(v.version)
        if v.state in (State.DISABLED, State.DESTROY_SCHEDULED) and v.version in restore:
            actions.append(Action(ActionKind.RESTORE, v.version, "restore requested"))
            continue
        if v.state is State.DISABLED and used:
            actions.append(
                Action(ActionKind.RESTORE, v.version, f"still referenced by {used} object(s)")
            )
            continue
        if (
            v.state in (State.DISABLED, State.DESTROY_SCHEDULED)
            and v.version == primary
            and not deleting
        ):
            # Inconsistent status: never destroy the version that wraps new data keys.
            blocked.append((v.version, "primary version"))
            continue
        if v.state is State.ENABLED and (deleting or v.version != primary):
            start = now if deleting else superseded_at(versions, v.version)
            if start is not None and v.restored_at is not None and not deleting:
                start = max(start, v.restored_at)  # a restore restarts the retirement clock
            if start is None or (retire_after is None and not deleting):
                continue
            retire_at = start if deleting else start + (retire_after or dt.timedelta(0))
            if now < retire_at:
                due.append(retire_at)
            elif used:
                blocked.append((v.version, f"referenced by {used} object(s)"))
            elif deleting or window_open:
                actions.append(Action(ActionKind.DISABLE, v.version, "retired"))
            else:
                due.append(next_window_start(window, now))
        elif v.state is State.DISABLED:
            if retire_after is None and not deleting:
                continue  # without a policy (or retireAfter) nothing is destroyed automatically
            disabled = v.disabled_at or now
            schedule_at = now if deleting else disabled + (retire_after or dt.timedelta(0))
            if now < schedule_at:
                due.append(schedule_at)
            else:
                actions.append(Action(ActionKind.SCHEDULE_DESTROY, v.version, "disabled"))
        elif v.state is State.DESTROY_SCHEDULED:
            destroy_at = v.destroy_at
            if destroy_at is None:
                # Missing or garbled destroyAt: start the waiting period again, never destroy now.
                actions.append(Action(ActionKind.SCHEDULE_DESTROY, v.version, "destroyAt missing"))
            elif now < destroy_at:
                due.append(destroy_at)
            elif used:
                blocked.append((v.version, f"destruction refused: referenced by {used} object(s)"))
            else:
                actions.append(Action(ActionKind.DESTROY, v.version, "waiting period over"))
    return Plan(tuple(actions), tuple(blocked), min(due) if due else None)


def apply(
    v: Version, action: Action, now: dt.datetime, policy: RotationPolicySpec | None
) -> Version:
    """The version after ``action`` succeeded in the HSM."""
    if action.kind is ActionKind.DISABLE:
        return replace(v, state=State.DISABLED, disabled_at=now)
    if action.kind is ActionKind.SCHEDULE_DESTROY:
        wait = policy.destroy_after if policy else DEFAULT_DESTROY_AFTER
        return replace(v, state=State.DESTROY_SCHEDULED, destroy_at=now + wait)
    if action.kind is ActionKind.DESTROY:
        return replace(v, state=State.DESTROYED, destroyed_at=now)
    return replace(v, state=State.ENABLED, disabled_at=None, destroy_at=None, restored_at=now)


def destruction_impact(versions: Sequence[Version], refs: References) -> list[dict[str, int]]:
    """For each version scheduled for destruction: what it would make unreadable."""
    return [
        {
            "version": v.version,
            "dataKeys": refs.data_keys.get(v.version, 0),
            "secrets": refs.secrets.get(v.version, 0),
        }
        for v in versions
        if v.state is State.DESTROY_SCHEDULED and refs.count(v.version)
    ]
