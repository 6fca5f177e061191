"""One reconcile pass over one KeyRing: what it read, and the status it writes back.

The status is written right after each change, guarded by the object's resourceVersion, so
a crash or a stale view repeats at most an idempotent step.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kustody.api.client import VersionState
from kustody.controller.runtime import Runtime, matters_to_datakeys
from kustody.domain.conditions import Condition, merge
from kustody.domain.lifecycle import State, Version
from kustody.domain.objects import ObjectMeta
from kustody.kube.resources import KEYRINGS

FINALIZER = "kustody.io/keyring-protection"
RESYNC_SECONDS = 300.0

TOKEN_STATE = {
    VersionState.ENABLED: State.ENABLED,
    VersionState.DISABLED: State.DISABLED,
    VersionState.DESTROY_SCHEDULED: State.DESTROY_SCHEDULED,
    VersionState.DESTROYED: State.DESTROYED,
}
# What the token must say for each state of the status (the sidecar keeps its own record of
# a scheduled destruction and refuses DestroyVersion before its minimum waiting period).
WANT_TOKEN = {
    State.ENABLED: VersionState.ENABLED,
    State.DISABLED: VersionState.DISABLED,
    State.DESTROY_SCHEDULED: VersionState.DESTROY_SCHEDULED,
}
REACHABLE = Condition("HSMReachable", True, "Reachable", "the HSM sidecar answers")


class IntegrityError(Exception):
    """The token does not hold what the status recorded: act on nothing until it does."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class KeyRingPass:
    """Mutable state of one reconcile pass over one KeyRing."""

    def __init__(self, rt: Runtime, obj: Mapping[str, Any], *, escrow: bool = False) -> None:
        self.rt = rt
        self.obj = obj
        self.meta = ObjectMeta.of(obj)
        self.name = self.meta.name
        self.status: dict[str, Any] = dict(obj.get("status") or {})
        self.versions = [Version.from_status(v) for v in self.status.get("versions") or ()]
        self.now = rt.clock()
        self.conditions: list[Condition] = []
        # spec.escrow: new versions are created extractable only under trusted keys.
        self.escrow = escrow

    @property
    def primary(self) -> int | None:
        value = self.status.get("primaryVersion")
        return int(value) if value else None

    def set_versions(self, versions: Sequence[Version]) -> None:
        self.versions = sorted(versions, key=lambda v: v.version)
        self.status["versions"] = [v.to_status() for v in self.versions]

    async def save(self) -> None:
        """Write the status now (guarded by resourceVersion) if it changed."""
        self.status["observedGeneration"] = self.meta.generation or None
        self.status["conditions"] = merge(
            self.status.get("conditions") or (), self.conditions, self.meta.generation, self.now
        )
        if self.status == (self.obj.get("status") or {}):
            return
        updated = await self.rt.kube.patch_status(
            KEYRINGS, self.name, self.status, resource_version=self.meta.resource_version or None
        )
        self.rt.keyrings.put(updated)
        # The watch echo of our own write is absorbed by the store: fan out here instead.
        if matters_to_datakeys(self.obj, updated):
            self.rt.enqueue_datakeys_of(self.name)
        self.obj = updated
        self.meta = ObjectMeta.of(updated)
        self.status = dict(updated.get("status") or {})

    async def set_finalizers(self, finalizers: Sequence[str]) -> None:
        patch = {
            "metadata": {
                "finalizers": list(finalizers),
                "resourceVersion": self.meta.resource_version,
            }
        }
        updated = await self.rt.kube.patch(KEYRINGS, self.name, patch)
        self.rt.keyrings.put(updated)
        self.obj = updated
        self.meta = ObjectMeta.of(updated)


def camel(reason: str) -> str:
    """``TOKEN_LOST`` → ``TokenLost`` (a condition reason from an HSM reason)."""
    return "".join(part.capitalize() for part in reason.split("_"))
