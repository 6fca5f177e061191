"""Async client of the sidecar's KeyService, for the operator (grpc.aio).

Every failure is an :class:`~kustody.api.errors.HsmError` with a stable
:class:`~kustody.api.errors.Reason`; batch calls return an HsmError per failed item instead.

    async with HsmClient.unix("/run/kustody/hsm.sock") as hsm:
        await hsm.create_key_version("payments", 1)
        key = await hsm.generate_data_key("payments", Binding("shop", "db-key"))
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import grpc
import grpc.aio

from kustody.api._proto import keyservice_pb2 as pb
from kustody.api._proto import keyservice_pb2_grpc as pb_grpc
from kustody.api.errors import HsmError, Reason, from_domain
from kustody.api.health import Health, reason_of
from kustody.api.rpcerror import from_rpc_error
from kustody.domain.aad import Binding
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import (
    KeyDescription,
    KeyVersionRef,
    VersionInfo,
    VersionState,
    settable,
)

__all__ = [
    "Binding",
    "DataKey",
    "EscrowPackageReply",
    "GenerateItem",
    "Health",
    "HsmClient",
    "HsmError",
    "KeyDescription",
    "ReWrapped",
    "Reason",
    "VersionInfo",
    "VersionState",
]

T = TypeVar("T")
_STATES = {
    pb.ENABLED: VersionState.ENABLED,
    pb.DISABLED: VersionState.DISABLED,
    pb.DESTROY_SCHEDULED: VersionState.DESTROY_SCHEDULED,
    pb.DESTROYED: VersionState.DESTROYED,
}
# ENABLED or DISABLED cancel a scheduled destruction; DESTROY_SCHEDULED disables the version
# and records in the token when (DestroyVersion is accepted only after the waiting period).
_TO_PB_STATE = {
    VersionState.ENABLED: pb.ENABLED,
    VersionState.DISABLED: pb.DISABLED,
    VersionState.DESTROY_SCHEDULED: pb.DESTROY_SCHEDULED,
}


@dataclass(frozen=True)
class DataKey:
    wrapped: str  # "kustody:v1:..." for a Secret
    version: int
    plaintext: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class ReWrapped:
    wrapped: str
    from_version: int
    to_version: int


@dataclass(frozen=True)
class EscrowPackageReply:
    """ExportEscrow's answer: what an escrow package holds (domain.escrow.Package)."""

    key_ring: str
    version: int
    agent_fingerprint: str
    label: str
    object_id: bytes
    check_value: str
    mechanism: str
    wrapped: bytes = field(repr=False)


@dataclass(frozen=True)
class GenerateItem:
    """One item of :meth:`HsmClient.batch_generate_data_keys`."""

    key_ring: str
    binding: Binding
    version: int | None = None
    length: int = 32
    return_plaintext: bool = False
    allow_plaintext_export: bool = False


def _binding_pb(binding: Binding) -> pb.Binding:
    return pb.Binding(
        namespace=binding.namespace,
        name=binding.name,
        encryption_context=dict(binding.context),
    )


def _version(message: pb.KeyVersion) -> VersionInfo:
    return VersionInfo(
        KeyVersionRef(message.key_ring, message.version),
        _STATES[message.state],
        message.fingerprint,
        message.escrowable,
    )


def _data_key(message: pb.DataKey) -> DataKey:
    return DataKey(message.wrapped, message.version, message.plaintext or None)


def _generate_pb(item: GenerateItem) -> pb.GenerateDataKeyRequest:
    return pb.GenerateDataKeyRequest(
        key_ring=item.key_ring,
        version=item.version or 0,
        binding=_binding_pb(item.binding),
        length=item.length,
        return_plaintext=item.return_plaintext,
        allow_plaintext_export=item.allow_plaintext_export,
    )


def _item_error(message: pb.ItemError) -> HsmError:
    try:
        reason = Reason(message.reason)
    except ValueError:
        reason = Reason.INTERNAL
    return HsmError(reason, message.message)


class HsmClient:
    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._channel = channel
        self._stub: Any = pb_grpc.KeyServiceStub(channel)  # type: ignore[no-untyped-call]
        self.timeout = timeout

    @classmethod
    def unix(cls, path: str | Path, *, timeout: float = 10.0) -> HsmClient:
        return cls(grpc.aio.insecure_channel(f"unix:{path}"), timeout=timeout)

    @classmethod
    def tcp(
        cls,
        target: str,
        *,
        ca: bytes,
        cert: bytes,
        key: bytes,
        server_name: str | None = None,
        timeout: float = 10.0,
    ) -> HsmClient:
        """mTLS to a remote sidecar (``host:port``); ``ca`` verifies the server."""
        credentials = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
        options = [("grpc.ssl_target_name_override", server_name)] if server_name else None
        return cls(grpc.aio.secure_channel(target, credentials, options), timeout=timeout)

    async def close(self) -> None:
        await self._channel.close(None)

    async def __aenter__(self) -> HsmClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        try:
            return await method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    # -- versions ----------------------------------------------------------------------------

    async def create_key_version(
        self, key_ring: str, version: int, *, escrow: bool = False
    ) -> VersionInfo:
        request = pb.CreateKeyVersionRequest(key_ring=key_ring, version=version, escrow=escrow)
        return _version(await self._call(self._stub.CreateKeyVersion, request))

    async def export_escrow(
        self, key_ring: str, version: int, agent_fingerprint: str
    ) -> EscrowPackageReply:
        """The version wrapped inside the token under the escrow agent's public key."""
        request = pb.ExportEscrowRequest(
            key_ring=key_ring, version=version, agent_fingerprint=agent_fingerprint
        )
        reply = await self._call(self._stub.ExportEscrow, request)
        return EscrowPackageReply(
            reply.key_ring,
            reply.version,
            reply.agent_fingerprint,
            reply.label,
            bytes(reply.object_id),
            reply.check_value,
            reply.mechanism,
            bytes(reply.wrapped),
        )

    async def escrow_agent_admitted(self, agent_fingerprint: str) -> bool:
        request = pb.DescribeEscrowAgentRequest(agent_fingerprint=agent_fingerprint)
        reply = await self._call(self._stub.DescribeEscrowAgent, request)
        return bool(reply.admitted)

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo:
        try:
            settable(state)
        except DomainError as exc:
            raise from_domain(exc) from None
        request = pb.SetVersionStateRequest(
            key_ring=key_ring, version=version, state=_TO_PB_STATE[state]
        )
        return _version(await self._call(self._stub.SetVersionState, request))

    async def destroy_version(self, key_ring: str, version: int) -> VersionInfo:
        request = pb.DestroyVersionRequest(key_ring=key_ring, version=version)
        return _version(await self._call(self._stub.DestroyVersion, request))

    async def describe_key(self, key_ring: str) -> KeyDescription:
        reply = await self._call(self._stub.DescribeKey, pb.DescribeKeyRequest(key_ring=key_ring))
        return KeyDescription(
            reply.key_ring,
            reply.primary_version or None,
            tuple(_version(v) for v in reply.versions),
        )

    async def health(self) -> Health:
        reply = await self._call(self._stub.Health, pb.HealthRequest())
        serving = reply.status == pb.HealthResponse.SERVING
        return Health(serving, reason_of(reply.reason), reply.message)

    # -- data keys ---------------------------------------------------------------------------

    async def generate_data_key(
        self,
        key_ring: str,
        binding: Binding,
        *,
        version: int | None = None,
        length: int = 32,
        return_plaintext: bool = False,
        allow_plaintext_export: bool = False,
    ) -> DataKey:
        """A new DEK wrapped under ``version`` (default: the primary version)."""
        item = GenerateItem(
            key_ring, binding, version, length, return_plaintext, allow_plaintext_export
        )
        return _data_key(await self._call(self._stub.GenerateDataKey, _generate_pb(item)))

    async def batch_generate_data_keys(
        self, items: Sequence[GenerateItem]
    ) -> list[DataKey | HsmError]:
        request = pb.BatchGenerateDataKeyRequest(items=[_generate_pb(i) for i in items])
        reply = await self._call(self._stub.BatchGenerateDataKey, request)
        return [
            _data_key(r.data_key) if r.HasField("data_key") else _item_error(r.error)
            for r in reply.results
        ]

    async def decrypt(
        self, wrapped: str, binding: Binding, *, allow_plaintext_export: bool
    ) -> bytes:
        request = pb.DecryptRequest(
            wrapped=wrapped,
            binding=_binding_pb(binding),
            allow_plaintext_export=allow_plaintext_export,
        )
        reply = await self._call(self._stub.Decrypt, request)
        plaintext: bytes = reply.plaintext
        return plaintext

    async def rewrap(
        self, wrapped: str, binding: Binding, *, to_version: int | None = None
    ) -> ReWrapped:
        request = pb.ReWrapRequest(
            wrapped=wrapped, binding=_binding_pb(binding), to_version=to_version or 0
        )
        reply = await self._call(self._stub.ReWrap, request)
        return ReWrapped(reply.wrapped, reply.from_version, reply.to_version)

    async def batch_rewrap(
        self, items: Sequence[tuple[str, Binding]], *, to_version: int | None = None
    ) -> list[ReWrapped | HsmError]:
        request = pb.BatchReWrapRequest(
            items=[
                pb.ReWrapRequest(wrapped=w, binding=_binding_pb(b), to_version=to_version or 0)
                for w, b in items
            ]
        )
        reply = await self._call(self._stub.BatchReWrap, request)
        return [
            ReWrapped(r.rewrapped.wrapped, r.rewrapped.from_version, r.rewrapped.to_version)
            if r.HasField("rewrapped")
            else _item_error(r.error)
            for r in reply.results
        ]
