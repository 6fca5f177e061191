"""The operator-facing gRPC KeyService: protobuf in, KeyService calls, protobuf out.

Policy lives here, not in :class:`KeyService`: plaintext DEKs leave only when the caller asks
and states that the KeyRing's ``spec.allowPlaintextExport`` is true. A future workload service
(authenticated by ServiceAccount token) wraps the same KeyService with its own policy.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import VersionInfo, VersionState
from kustody.hsm._proto import keyservice_pb2 as pb
from kustody.hsm._proto import keyservice_pb2_grpc as pb_grpc
from kustody.hsm.errors import HsmError, Reason, from_domain
from kustody.hsm.keyservice import (
    DEFAULT_DEK_BYTES,
    GeneratedKey,
    GenerateRequest,
    KeyService,
    RewrapRequest,
    check_batch,
)
from kustody.hsm.metrics import Metrics
from kustody.hsm.rpccall import observed
from kustody.hsm.rpcerror import Context

T = TypeVar("T")
R = TypeVar("R")

_STATES = {
    VersionState.ENABLED: pb.ENABLED,
    VersionState.DISABLED: pb.DISABLED,
    VersionState.DESTROYED: pb.DESTROYED,
}
_FROM_PB_STATE = {pb.ENABLED: VersionState.ENABLED, pb.DISABLED: VersionState.DISABLED}


def version_pb(info: VersionInfo) -> pb.KeyVersion:
    return pb.KeyVersion(
        key_ring=info.ref.key_ring,
        version=info.ref.version,
        state=_STATES[info.state],
        fingerprint=info.fingerprint,
    )


def binding_from(message: pb.Binding) -> Binding:
    context = message.encryption_context
    return Binding(message.namespace, message.name, {k: context[k] for k in context})


def error_pb(error: HsmError) -> pb.ItemError:
    return pb.ItemError(reason=str(error.reason), message=error.message)


def _generate_request(message: pb.GenerateDataKeyRequest) -> GenerateRequest:
    if message.return_plaintext and not message.allow_plaintext_export:
        raise HsmError(
            Reason.PLAINTEXT_EXPORT_FORBIDDEN,
            f"KeyRing {message.key_ring} does not allow plaintext export",
        )
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
    def __init__(self, service: KeyService, metrics: Metrics) -> None:
        self._service = service
        self._metrics = metrics

    async def _call(self, op: str, context: Context, work: Callable[[], Awaitable[T]]) -> T:
        return await observed(self._metrics, op, context, work)

    async def CreateKeyVersion(
        self, request: pb.CreateKeyVersionRequest, context: Context
    ) -> pb.KeyVersion:
        async def work() -> pb.KeyVersion:
            info = await self._service.create_key_version(request.key_ring, request.version)
            return version_pb(info)

        return await self._call("CreateKeyVersion", context, work)

    async def GenerateDataKey(
        self, request: pb.GenerateDataKeyRequest, context: Context
    ) -> pb.DataKey:
        async def work() -> pb.DataKey:
            return _data_key_pb(await self._service.generate_data_key(_generate_request(request)))

        return await self._call("GenerateDataKey", context, work)

    async def BatchGenerateDataKey(
        self, request: pb.BatchGenerateDataKeyRequest, context: Context
    ) -> pb.BatchGenerateDataKeyResponse:
        async def work() -> pb.BatchGenerateDataKeyResponse:
            items = request.items
            check_batch(len(items))
            errors: dict[int, HsmError] = {}

            def valid() -> Iterator[GenerateRequest]:
                # Decoded lazily: the key service sends each chunk to the worker as soon as it
                # is taken, so decoding the next chunk overlaps the worker sealing this one.
                for i, item in enumerate(items):
                    try:
                        yield _generate_request(item)
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
        async def work() -> pb.DecryptResponse:
            envelope = Envelope.from_text(request.wrapped)
            binding = binding_from(request.binding)
            if not request.allow_plaintext_export:
                raise HsmError(
                    Reason.PLAINTEXT_EXPORT_FORBIDDEN,
                    f"KeyRing {envelope.key.key_ring} does not allow plaintext export",
                )
            plaintext = await self._service.decrypt(envelope, binding)
            return pb.DecryptResponse(plaintext=plaintext, version=envelope.key.version)

        return await self._call("Decrypt", context, work)

    async def ReWrap(self, request: pb.ReWrapRequest, context: Context) -> pb.ReWrapped:
        async def work() -> pb.ReWrapped:
            rewrap = _rewrap_request(request)
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
        async def work() -> pb.BatchReWrapResponse:
            items = request.items
            check_batch(len(items))
            errors: dict[int, HsmError] = {}
            from_versions: list[int] = []

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
                    yield rewrap

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
        async def work() -> pb.KeyVersion:
            state = _FROM_PB_STATE.get(request.state)
            if state is None:
                raise HsmError(Reason.INVALID_ARGUMENT, "state must be ENABLED or DISABLED")
            info = await self._service.set_version_state(request.key_ring, request.version, state)
            return version_pb(info)

        return await self._call("SetVersionState", context, work)

    async def DestroyVersion(
        self, request: pb.DestroyVersionRequest, context: Context
    ) -> pb.KeyVersion:
        async def work() -> pb.KeyVersion:
            info = await self._service.destroy_version(request.key_ring, request.version)
            return version_pb(info)

        return await self._call("DestroyVersion", context, work)

    async def DescribeKey(
        self, request: pb.DescribeKeyRequest, context: Context
    ) -> pb.KeyDescription:
        async def work() -> pb.KeyDescription:
            description = await self._service.describe_key(request.key_ring)
            return pb.KeyDescription(
                key_ring=description.key_ring,
                primary_version=description.primary_version or 0,
                versions=[version_pb(v) for v in description.versions],
            )

        return await self._call("DescribeKey", context, work)

    async def Health(self, request: pb.HealthRequest, context: Context) -> pb.HealthResponse:
        async def work() -> pb.HealthResponse:
            health = await self._service.health()
            status = pb.HealthResponse.SERVING if health.serving else pb.HealthResponse.NOT_SERVING
            return pb.HealthResponse(
                status=status,
                reason=str(health.reason or ""),
                message=health.message,
                token_label=self._service.connection.config.label,
            )

        return await self._call("Health", context, work)
