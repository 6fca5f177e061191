"""What a reconciler needs from the world, as small Protocols.

The operator process plugs in the real clients (:class:`kustody.kube.api.Kube`,
:class:`kustody.api.client.HsmClient`, :class:`kustody.kube.events.EventRecorder`); tests plug
in the in-memory fakes of :mod:`kustody.testing.fakes` and run a reconciler in milliseconds.
Each Protocol lists only the calls the controller makes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

from kustody.api.client import (
    Binding,
    DataKey,
    EscrowPackageReply,
    GenerateItem,
    Health,
    HsmError,
    KeyDescription,
    ReWrapped,
    VersionInfo,
    VersionState,
)
from kustody.kube.protocol import KubeApi

__all__ = ["Clock", "Events", "KeyService", "KubeApi"]

Clock = Callable[[], dt.datetime]
"""The time reconcilers decide with (timezone-aware UTC)."""


class KeyService(Protocol):
    """The sidecar's KeyService as the controller uses it (:class:`HsmClient`)."""

    async def create_key_version(
        self, key_ring: str, version: int, *, escrow: bool = False
    ) -> VersionInfo: ...

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo: ...

    async def destroy_version(self, key_ring: str, version: int) -> VersionInfo: ...

    async def describe_key(self, key_ring: str) -> KeyDescription: ...

    async def health(self) -> Health: ...

    async def batch_generate_data_keys(
        self, items: Sequence[GenerateItem]
    ) -> list[DataKey | HsmError]: ...

    async def batch_rewrap(
        self, items: Sequence[tuple[str, Binding]], *, to_version: int | None = None
    ) -> list[ReWrapped | HsmError]: ...

    async def decrypt(
        self, wrapped: str, binding: Binding, *, allow_plaintext_export: bool
    ) -> bytes: ...

    async def export_escrow(
        self, key_ring: str, version: int, agent_fingerprint: str
    ) -> EscrowPackageReply: ...

    async def escrow_agent_admitted(self, agent_fingerprint: str) -> bool: ...

    async def close(self) -> None: ...


class Events(Protocol):
    """Kubernetes Events about an object (:class:`kustody.kube.events.EventRecorder`)."""

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None: ...

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None: ...
