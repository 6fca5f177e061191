"""One reconcile pass over one DataKey: the objects it read (parsed once), the generations it
changes, the Events it owes, and the status writes."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kustody.api.client import Binding
from kustody.controller.runtime import Runtime
from kustody.domain import keyset
from kustody.domain.conditions import Condition, merge
from kustody.domain.objects import ObjectMeta
from kustody.domain.specs import DataKeySpec, KeyRingSpec
from kustody.kube.errors import NotFound
from kustody.kube.resources import DATAKEYS


class NotReady(Exception):
    """The DataKey cannot be served now; Ready=False with this reason and message.
    ``revokes_plaintext``: a plaintext entry already published must be withdrawn."""

    def __init__(self, reason: str, message: str, *, revokes_plaintext: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.revokes_plaintext = revokes_plaintext


@dataclass(frozen=True)
class KeyRingView:
    """The DataKey's KeyRing as this pass sees it."""

    obj: Mapping[str, Any]
    meta: ObjectMeta
    spec: KeyRingSpec
    primary: int


@dataclass
class DataKeyPass:
    """Mutable state of one reconcile pass over one DataKey."""

    rt: Runtime
    obj: Mapping[str, Any]
    spec: DataKeySpec
    keyring: KeyRingView
    now: dt.datetime
    meta: ObjectMeta = field(init=False)
    status: dict[str, Any] = field(init=False)
    generations: list[keyset.Generation] = field(init=False)
    binding: Binding = field(init=False)  # what every wrapped key of this DataKey is bound to
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)

    def __post_init__(self) -> None:
        self.meta = ObjectMeta.of(self.obj)
        self.status = dict(self.obj.get("status") or {})
        self.generations = keyset.from_status(self.status, self.meta.uid)
        self.binding = Binding(self.namespace, self.name, dict(self.spec.encryption_context))

    @property
    def namespace(self) -> str:
        return self.meta.namespace or ""

    @property
    def name(self) -> str:
        return self.meta.name

    def note(self, reason: str, message: str, *, warning: bool = False) -> None:
        self.events.append(("Warning" if warning else "Normal", reason, message))

    async def flush_events(self) -> None:
        for kind, reason, message in self.events:
            emit = self.rt.events.normal if kind == "Normal" else self.rt.events.warning
            await emit(self.obj, reason, message)

    async def write_status(self, status: Mapping[str, Any]) -> bool:
        """Patch ``status`` (guarded by resourceVersion) if it differs; returns whether it
        wrote."""
        if dict(status) == (self.obj.get("status") or {}):
            return False
        updated = await self.rt.kube.patch_status(
            DATAKEYS,
            self.name,
            status,
            self.namespace,
            resource_version=self.meta.resource_version or None,
        )
        self.rt.datakeys.put(updated)
        self.obj = updated
        self.meta = ObjectMeta.of(updated)
        return True


async def set_not_ready(rt: Runtime, obj: Mapping[str, Any], reason: str, message: str) -> None:
    """Ready=False with ``reason`` (an Event when the reason is new); a DataKey deleted
    meanwhile is left alone."""
    meta = ObjectMeta.of(obj)
    before = obj.get("status") or {}
    status = dict(before)
    condition = Condition("Ready", False, reason, message)
    status["conditions"] = merge(
        status.get("conditions") or (), [condition], meta.generation, rt.clock()
    )
    status["observedGeneration"] = meta.generation or None
    if status == before:
        return
    try:
        updated = await rt.kube.patch_status(DATAKEYS, meta.name, status, meta.namespace)
    except NotFound:
        return
    rt.datakeys.put(updated)
    old = {c.get("type"): c for c in before.get("conditions") or ()}
    if (old.get("Ready") or {}).get("reason") != reason:
        await rt.events.warning(obj, reason, message)
