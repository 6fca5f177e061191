"""The operator-facing gRPC KeyService: protobuf in, KeyService calls, protobuf out.

Policy lives here, not in :class:`KeyService`:

* who may call which RPC (:mod:`kustody.sidecar.access`): the pod-local unix socket is trusted;
  over TCP the client certificate's identity must be allow-listed with a role that includes
  the RPC;
* plaintext DEKs leave only on the unix socket, when the caller asks and states that the
  KeyRing's ``spec.allowPlaintextExport`` is true; over TCP never, whatever the request says;
* audited calls leave one JSON line each (:mod:`kustody.sidecar.audit`).

The workload unwrap service (:mod:`kustody.sidecar.unwrap`) uses the same KeyService with its own
authorisation (ServiceAccount tokens), not this servicer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from kustody.api._proto import keyservice_pb2 as pb
from kustody.api._proto import keyservice_pb2_grpc as pb_grpc
from kustody.api.errors import HsmError, Reason, from_domain
from kustody.api.rpcerror import Context
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError
from kustody.domain.escrow import MECHANISM as ESCROW_MECHANISM
from kustody.domain.keyversion import KeyVersionRef, VersionInfo, VersionState, settable
from kustody.sidecar import audit
from kustody.sidecar.access import LOCAL, Access, Caller, LocalAccess
from kustody.sidecar.keyservice import (
    DEFAULT_DEK_BYTES,
    GeneratedKey,
    GenerateRequest,
    KeyService,
    RewrapRequest,
    check_batch,
)
from kustody.sidecar.metrics import Metrics
from kustody.sidecar.rpccall import observed

T = TypeVar("T")
R = TypeVar("R")

_STATES = {
    VersionState.ENABLED: pb.ENABLED,
    VersionState.DISABLED: pb.DISABLED,
    VersionState.DESTROY_SCHEDULED: pb.DESTROY_SCHEDULED,
    VersionState.DESTROYED: pb.DESTROYED,
}
_FROM_PB_STATE = {
    pb.ENABLED: VersionState.ENABLED,
    pb.DISABLED: VersionState.DISABLED,
    pb.DESTROY_SCHEDULED: VersionState.DESTROY_SCHEDULED,
}
# Always audited, whoever calls and however it ends.
_AUDITED = frozenset(
    {"CreateKeyVersion", "SetVersionState", "DestroyVersion", "Decrypt", "ExportEscrow"}
)
# Refusals by policy: audited on every RPC.
_REFUSALS = frozenset(
    str(r)
    for r in (
        Reason.PERMISSION_DENIED,
        Reason.PLAINTEXT_EXPORT_FORBIDDEN,
        Reason.KEY_NOT_TRUSTED,
        Reason.DESTRUCTION_NOT_DUE,
        Reason.VERSION_NOT_DISABLED,
        Reason.ESCROW_AGENT_NOT_ADMITTED,
        Reason.VERSION_NOT_ESCROWABLE,
    )
)
_MAX_RINGS_NOTED = 8


@dataclass
class _Note:
    """What the audit line of one call says about its target."""

    key_ring: str = ""
    version: int = 0
    items: int = 0
    plaintext: bool = False  # the call asked for plaintext
    agent: str = ""  # the escrow agent's fingerprint (ExportEscrow)

    def rings(self, names: Iterator[str]) -> None:
        distinct = sorted(set(names))
        more = len(distinct) - _MAX_RINGS_NOTED
        self.key_ring = ",".join(distinct[:_MAX_RINGS_NOTED]) + (f",+{more}" if more > 0 else "")


def audited(op: str, caller: Caller, note: _Note, outcome: str) -> bool:
    return (
        op in _AUDITED
        or note.plaintext
        or (not caller.local and op != "Health")
        or outcome in _REFUSALS
    )


def version_pb(info: VersionInfo) -> pb.KeyVersion:
    return pb.KeyVersion(
        key_ring=info.ref.key_ring,
        version=info.ref.version,
        state=_STATES[info.state],
        fingerprint=info.fingerprint,
        escrowable=info.escrowable,
    )


def binding_from(message: pb.Binding) -> Binding:
    context = message.encryption_context
    return Binding(message.namespace, message.name, {k: context[k] for k in context})


def _plaintext_allowed(caller: Caller, key_ring: str, allow_plaintext_export: bool) -> None:
    if not caller.local:
        raise HsmError(
            Reason.PLAINTEXT_EXPORT_FORBIDDEN,
            "plaintext export is only available on the sidecar's local unix socket, "
            f"never over TCP (KeyRing {key_ring[:253]})",
        )
    if not allow_plaintext_export:
        raise HsmError(
            Reason.PLAINTEXT_EXPORT_FORBIDDEN,
            f"KeyRing {key_ring[:253]} does not allow plaintext export",
        )


def _generate_request(message: pb.GenerateDataKeyRequest, caller: Caller) -> GenerateRequest:
    if message.return_plaintext:
        _plaintext_allowed(caller, message.key_ring, message.allow_plaintext_export)
    return GenerateRequest(
        key_ring=message.key_ring,
        binding=binding_from(message.binding),
        version=message.version or None,
        length=message.length or DEFAULT_DEK_BYTES,
        include_plaintext=message.return_plaintext,
    )


def _data_key_pb(key: GeneratedKey) -> pb.DataKey:
    return pb.DataKey(
        wrapped=key.envelope.to_text(),
        version=key.envelope.key.version,
        plaintext=key.plaintext or b"",
    )


def _rewrap_request(message: pb.ReWrapRequest) -> RewrapRequest:
    return RewrapRequest(
        Envelope.from_text(message.wrapped),
        binding_from(message.binding),
        message.to_version or None,
    )


def _set_error(target: pb.ItemError, error: HsmError) -> None:
    target.reason = str(error.reason)
    target.message = error.message


class _InOrder(Generic[R]):
    """Appends a batch's per-item results in request order: ``next()`` is the next item that
    went to the worker, after the items refused while decoding (``errors`` by index), which
    are filled in on the way. ``errors`` must be complete before the first ``next()``: the
    key service takes every item before it hands back the first chunk."""

    def __init__(self, add: Callable[[], R], errors: dict[int, HsmError]) -> None:
        self._add = add
        self._errors = errors
        self._position = 0

    def _refused(self) -> None:
        while self._position in self._errors:
            _set_error(self._add().error, self._errors[self._position])  # type: ignore[attr-defined]
            self._position += 1

    def next(self) -> R:
        self._refused()
        self._position += 1
        return self._add()

    def finish(self) -> None:
        self._refused()


class KeyServiceServicer(pb_grpc.KeyServiceServicer):
    def __init__(self, service: KeyService, metrics: Metrics, access: Access | None = None) -> None:
        self._service = service
        self._metrics = metrics
        self._access: Access = access or LocalAccess()

    async def _call(
        self,
        op: str,
        context: Context,
        work: Callable[[Caller, _Note], Awaitable[T]],
        note: _Note | None = None,
    ) -> T:
        """Authorise, run, count and (where :func:`audited`) audit one call. The outcome is
        ``ok`` only once the response is built; a cancelled call is audited as such."""
        access = self._access
        note = note or _Note()

        async def run() -> T:
            caller = LOCAL
            outcome = "cancelled"
            try:
                caller = access.identify(context)
                access.check(caller, op)
                result = await work(caller, note)
                outcome = "ok"
                return result
            except HsmError as exc:
                outcome = str(exc.reason)
                raise
            except DomainError as exc:
                outcome = str(from_domain(exc).reason)
                raise
            except asyncio.CancelledError:
                raise
            except Exception:
                outcome = str(Reason.INTERNAL)
                raise
            finally:
                if audited(op, caller, note, outcome):
                    audit.emit(
                        rpc=op,
                        peer=caller.identity,
                        role=str(caller.role or ""),
                        key_ring=note.key_ring,
                        version=note.version,
                        items=note.items,
                        outcome=outcome,
                        agent=note.agent,
                    )

        return await observed(self._metrics, op, context, run)

    async def CreateKeyVersion(
        self, request: pb.CreateKeyVersionRequest, context: Context
    ) -> pb.KeyVersion:
        async def work(caller: Caller, note: _Note) -> pb.KeyVersion:
            info = await self._service.create_key_version(
                request.key_ring, request.version, escrow=request.escrow
            )
            return version_pb(info)

        note = _Note(request.key_ring, request.version)
        return await self._call("CreateKeyVersion", context, work, note)

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Context
    ) -> pb.DataKey:
        async def work(caller: Caller, note: _Note) -> pb.DataKey:
            generate = _generate_request(request, caller)
            return _data_key_pb(await self._service.generate_data_key(generate))

        note = _Note(request.key_ring, request.version, plaintext=request.return_plaintext)
        return await self._call("GenerateDataKey", context, work, note)

    async def BatchGenerateDataKey(
        self, request: pb.BatchGenerateDataKeyRequest, context: Context
    ) -> pb.BatchGenerateDataKeyResponse:
        async def work(caller: Caller, note: _Note) -> pb.BatchGenerateDataKeyResponse:
            items = request.items
            check_batch(len(items))
            note.items = len(items)
            note.rings(i.key_ring for i in items)
            note.plaintext = any(i.return_plaintext for i in items)
            errors: dict[int, HsmError] = {}

            def valid() -> Iterator[GenerateRequest]:
                # Decoded lazily: the key service sends each chunk to the worker as soon as it
                # is taken, so decoding the next chunk overlaps the worker sealing this one.
                for i, item in enumerate(items):
                    try:
                        yield _generate_request(item, caller)
                    except HsmError as exc:
                        errors[i] = exc
                    except DomainError as exc:
                        errors[i] = from_domain(exc)

            response = pb.BatchGenerateDataKeyResponse()
            out = _InOrder(response.results.add, errors)
            async for chunk in self._service.generate_data_key_chunks(valid()):
                for key in chunk:  # results are filled in place: no per-item message copies
                    result = out.next()
                    if isinstance(key, HsmError):
                        _set_error(result.error, key)
                        continue
                    data_key = result.data_key
                    data_key.wrapped = key.envelope.to_text()
                    data_key.version = key.envelope.key.version
                    if key.plaintext:
                        data_key.plaintext = key.plaintext
            out.finish()
            return response

        return await self._call("BatchGenerateDataKey", context, work)

    async def Decrypt(self, request: pb.DecryptRequest, context: Context) -> pb.DecryptResponse:
        async def work(caller: Caller, note: _Note) -> pb.DecryptResponse:
            envelope = Envelope.from_text(request.wrapped)
            note.key_ring, note.version = envelope.key.key_ring, envelope.key.version
            binding = binding_from(request.binding)
            _plaintext_allowed(caller, envelope.key.key_ring, request.allow_plaintext_export)
            plaintext = await self._service.decrypt(envelope, binding)
            return pb.DecryptResponse(plaintext=plaintext, version=envelope.key.version)

        return await self._call("Decrypt", context, work)

    async def ReWrap(self, request: pb.ReWrapRequest, context: Context) -> pb.ReWrapped:
        async def work(caller: Caller, note: _Note) -> pb.ReWrapped:
            rewrap = _rewrap_request(request)
            note.key_ring, note.version = rewrap.envelope.key.key_ring, rewrap.envelope.key.version
            envelope = await self._service.rewrap(rewrap)
            return pb.ReWrapped(
                wrapped=envelope.to_text(),
                from_version=rewrap.envelope.key.version,
                to_version=envelope.key.version,
            )

        return await self._call("ReWrap", context, work)

    async def BatchReWrap(
        self, request: pb.BatchReWrapRequest, context: Context
    ) -> pb.BatchReWrapResponse:
        async def work(caller: Caller, note: _Note) -> pb.BatchReWrapResponse:
            items = request.items
            check_batch(len(items))
            note.items = len(items)
            errors: dict[int, HsmError] = {}
            from_versions: list[int] = []
            rings: set[str] = set()

            def valid() -> Iterator[RewrapRequest]:
                for i, item in enumerate(items):  # lazily, as in BatchGenerateDataKey
                    try:
                        rewrap = _rewrap_request(item)
                    except HsmError as exc:
                        errors[i] = exc
                        continue
                    except DomainError as exc:
                        errors[i] = from_domain(exc)
                        continue
                    from_versions.append(rewrap.envelope.key.version)
                    rings.add(rewrap.envelope.key.key_ring)
                    yield rewrap
                note.rings(iter(rings))

            response = pb.BatchReWrapResponse()
            out = _InOrder(response.results.add, errors)
            done = 0
            async for chunk in self._service.rewrap_chunks(valid()):
                for envelope in chunk:
                    result = out.next()
                    if isinstance(envelope, HsmError):
                        _set_error(result.error, envelope)
                    else:
                        rewrapped = result.rewrapped
                        rewrapped.wrapped = envelope.to_text()
                        rewrapped.from_version = from_versions[done]
                        rewrapped.to_version = envelope.key.version
                    done += 1
            out.finish()
            return response

        return await self._call("BatchReWrap", context, work)

    async def SetVersionState(
        self, request: pb.SetVersionStateRequest, context: Context
    ) -> pb.KeyVersion:
        async def work(caller: Caller, note: _Note) -> pb.KeyVersion:
            state = settable(_FROM_PB_STATE.get(request.state))
            info = await self._service.set_version_state(request.key_ring, request.version, state)
            return version_pb(info)

        note = _Note(request.key_ring, request.version)
        return await self._call("SetVersionState", context, work, note)

    async def DestroyVersion(
        self, request: pb.DestroyVersionRequest, context: Context
    ) -> pb.KeyVersion:
        async def work(caller: Caller, note: _Note) -> pb.KeyVersion:
            info = await self._service.destroy_version(request.key_ring, request.version)
            return version_pb(info)

        note = _Note(request.key_ring, request.version)
        return await self._call("DestroyVersion", context, work, note)

    async def DescribeKey(
        self, request: pb.DescribeKeyRequest, context: Context
    ) -> pb.KeyDescription:
        async def work(caller: Caller, note: _Note) -> pb.KeyDescription:
            description = await self._service.describe_key(request.key_ring)
            return pb.KeyDescription(
                key_ring=description.key_ring,
                primary_version=description.primary_version or 0,
                versions=[version_pb(v) for v in description.versions],
            )

        return await self._call("DescribeKey", context, work, _Note(request.key_ring))

    async def ExportEscrow(
        self, request: pb.ExportEscrowRequest, context: Context
    ) -> pb.EscrowPackage:
        async def work(caller: Caller, note: _Note) -> pb.EscrowPackage:
            ref = KeyVersionRef(request.key_ring, request.version)
            wrapped, check_value = await self._service.export_escrow(
                request.key_ring, request.version, request.agent_fingerprint
            )
            return pb.EscrowPackage(
                key_ring=ref.key_ring,
                version=ref.version,
                agent_fingerprint=request.agent_fingerprint,
                label=ref.label,
                object_id=ref.object_id,
                check_value=check_value,
                mechanism=ESCROW_MECHANISM,
                wrapped=wrapped,
            )

        note = _Note(request.key_ring, request.version, agent=request.agent_fingerprint)
        return await self._call("ExportEscrow", context, work, note)

    async def DescribeEscrowAgent(
        self, request: pb.DescribeEscrowAgentRequest, context: Context
    ) -> pb.EscrowAgentStatus:
        async def work(caller: Caller, note: _Note) -> pb.EscrowAgentStatus:
            admitted = await self._service.escrow_agent_admitted(request.agent_fingerprint)
            return pb.EscrowAgentStatus(admitted=admitted)

        return await self._call("DescribeEscrowAgent", context, work)

    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        async def work(caller: Caller, note: _Note) -> pb.HealthResponse:
            health = await self._service.health()
            status = pb.HealthResponse.SERVING if health.serving else pb.HealthResponse.NOT_SERVING
            return pb.HealthResponse(
                status=status,
                reason=str(health.reason or ""),
                message=health.message,
                token_label=self._service.connection.token_label,
            )

        return await self._call("Health", context, work)
