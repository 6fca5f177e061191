"""Status conditions per the Kubernetes API conventions (a list keyed by ``type``)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kustody.domain.timestamps import format_time


@dataclass(frozen=True)
class Condition:
    type: str
    status: bool | None  # None is "Unknown"
    reason: str
    message: str

    @property
    def status_text(self) -> str:
        return "Unknown" if self.status is None else ("True" if self.status else "False")


def merge(
    existing: Sequence[Mapping[str, Any]],
    updates: Sequence[Condition],
    generation: int,
    now: dt.datetime,
) -> list[dict[str, Any]]:
    """``existing`` with ``updates`` applied; lastTransitionTime changes only with status."""
    by_type = {str(c.get("type")): dict(c) for c in existing}
    for cond in updates:
        old = by_type.get(cond.type)
        changed = old is None or old.get("status") != cond.status_text
        by_type[cond.type] = {
            "type": cond.type,
            "status": cond.status_text,
            "observedGeneration": generation,
            "lastTransitionTime": (
                format_time(now)
                if changed or old is None or not old.get("lastTransitionTime")
                else old["lastTransitionTime"]
            ),
            "reason": cond.reason,
            "message": cond.message[:1024],
        }
    return sorted(by_type.values(), key=lambda c: str(c["type"]))


def find(conditions: Sequence[Mapping[str, Any]], type_: str) -> Mapping[str, Any] | None:
    return next((c for c in conditions if c.get("type") == type_), None)


def is_true(conditions: Sequence[Mapping[str, Any]], type_: str) -> bool:
    cond = find(conditions, type_)
    return cond is not None and cond.get("status") == "True"
