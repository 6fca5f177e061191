"""Envelope operations on top of the token, independent of any transport or caller policy.

Each method is one named operation in the PKCS#11 worker process (:mod:`kustody.hsm.worker`),
one round trip per call, batches included. Only what the operation needs crosses the pipe:
KeyRing, version, nonce, ciphertext, the encoded binding (AAD) and plaintext only where the API
returns or takes it.

The operator's gRPC servicer, the KMS v2 plugin and (later) an authenticated workload service
all use this class; each applies its own policy (who may see plaintext) before calling it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kustody.domain.aad import Binding, KmsBinding, associated_data
from kustody.domain.envelope import MAX_PLAINTEXT_BYTES, Envelope
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import KeyVersionRef, VersionInfo, VersionState, validate_key_ring
from kustody.hsm.connection import Health, HsmConnection, info_from_wire
from kustody.hsm.errors import HsmError, Reason, from_domain
from kustody.hsm.wire import Op

DEFAULT_DEK_BYTES = 32
MIN_DEK_BYTES = 16
MAX_DEK_BYTES = 512
MAX_BATCH_ITEMS = 1000


@dataclass(frozen=True)
class GenerateRequest:
    key_ring: str
    binding: Binding
    version: int | None = None  # None: the primary version
    length: int = DEFAULT_DEK_BYTES
    include_plaintext: bool = False


@dataclass(frozen=True)
class GeneratedKey:
    envelope: Envelope
    plaintext: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True)
class RewrapRequest:
    envelope: Envelope
    binding: Binding
    to_version: int | None = None  # None: the primary version


@dataclass(frozen=True)
class KeyDescription:
    key_ring: str
    primary_version: int | None
    versions: tuple[VersionInfo, ...]


def _checked_length(length: int) -> int:
    if not MIN_DEK_BYTES <= length <= MAX_DEK_BYTES:
        raise HsmError(
            Reason.INVALID_ARGUMENT,
            f"data key length {length} is outside {MIN_DEK_BYTES}..{MAX_DEK_BYTES} bytes",
        )
    return length


def check_batch(count: int) -> None:
    if count > MAX_BATCH_ITEMS:
        raise HsmError(
            Reason.REQUEST_TOO_LARGE, f"{count} items in one batch; the limit is {MAX_BATCH_ITEMS}"
        )


def _ref(key_ring: str, version: int) -> KeyVersionRef:
    try:
        return KeyVersionRef(key_ring, version)
    except DomainError as exc:
        raise from_domain(exc) from None


class _Refs:
    """KeyVersionRef per (KeyRing, version) while decoding one answer (validated once)."""

    def __init__(self) -> None:
        self._refs: dict[tuple[str, int], KeyVersionRef] = {}

    def get(self, key_ring: str, version: int) -> KeyVersionRef:
        ref = self._refs.get((key_ring, version))
        if ref is None:
            ref = self._refs[(key_ring, version)] = KeyVersionRef(key_ring, version)
        return ref


def _item_error(item: tuple[str, str]) -> HsmError:
    try:
        return HsmError(Reason(item[0]), item[1])
    except ValueError:
        return HsmError(Reason.INTERNAL, item[1])


class KeyService:
    def __init__(self, connection: HsmConnection) -> None:
        self.connection = connection

    # -- versions ----------------------------------------------------------------------------

    async def create_key_version(self, key_ring: str, version: int) -> VersionInfo:
        ref = _ref(key_ring, version)
        return info_from_wire(await self.connection.request(Op.CREATE, (ref.key_ring, ref.version)))

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo:
        ref = _ref(key_ring, version)
        if state not in (VersionState.ENABLED, VersionState.DISABLED):
            raise HsmError(Reason.INVALID_ARGUMENT, "the state must be ENABLED or DISABLED")
        args = (ref.key_ring, ref.version, str(state))
        return info_from_wire(await self.connection.request(Op.SET_STATE, args))

    async def destroy_version(self, key_ring: str, version: int) -> VersionInfo:
        ref = _ref(key_ring, version)
        return info_from_wire(
            await self.connection.request(Op.DESTROY, (ref.key_ring, ref.version))
        )

    async def describe_key(self, key_ring: str) -> KeyDescription:
        try:
            validate_key_ring(key_ring)
        except DomainError as exc:
            raise from_domain(exc) from None
        primary, versions = await self.connection.request(Op.DESCRIBE, (key_ring,))
        return KeyDescription(key_ring, primary, tuple(info_from_wire(v) for v in versions))

    async def version_info(self, key_ring: str, version: int | None) -> VersionInfo:
        return info_from_wire(await self.connection.request(Op.INFO, (key_ring, version)))

    async def health(self) -> Health:
        return await self.connection.check()

    # -- data keys ---------------------------------------------------------------------------

    async def generate_data_key(self, request: GenerateRequest) -> GeneratedKey:
        (result,) = await self.generate_data_keys([request])
        if isinstance(result, HsmError):
            raise result
        return result

    async def generate_data_keys(
        self, requests: Sequence[GenerateRequest]
    ) -> list[GeneratedKey | HsmError]:
        """All items in one trip to the worker, with one RNG call for the batch."""
        check_batch(len(requests))
        results: list[GeneratedKey | HsmError | None] = [None] * len(requests)
        valid: list[int] = []
        items: list[tuple[str, int | None, int, bool, bytes]] = []
        for i, request in enumerate(requests):
            try:
                length = _checked_length(request.length)
            except HsmError as exc:
                results[i] = exc
                continue
            valid.append(i)
            items.append(
                (
                    request.key_ring,
                    request.version,
                    length,
                    request.include_plaintext,
                    request.binding.encode(),
                )
            )
        if items:
            generated = await self.connection.request(Op.GENERATE, items)
            refs = _Refs()
            for i, item, answer in zip(valid, items, generated, strict=True):
                if len(answer) == 2:
                    results[i] = _item_error(answer)
                    continue
                version, nonce, sealed, plaintext = answer
                envelope = Envelope(refs.get(item[0], version), nonce, sealed)
                results[i] = GeneratedKey(envelope, plaintext)
        return [r for r in results if r is not None]

    async def decrypt(self, envelope: Envelope, binding: Binding | KmsBinding) -> bytes:
        """The plaintext of a wrapped key. Callers decide who may receive it."""
        key = envelope.key
        aad = associated_data(envelope.header, binding)
        args = (key.key_ring, key.version, envelope.nonce, envelope.ciphertext, aad)
        plaintext: bytes = await self.connection.request(Op.DECRYPT, args)
        return plaintext

    async def rewrap(self, request: RewrapRequest) -> Envelope:
        (result,) = await self.rewrap_many([request])
        if isinstance(result, HsmError):
            raise result
        return result

    async def rewrap_many(self, requests: Sequence[RewrapRequest]) -> list[Envelope | HsmError]:
        """All items in one trip to the worker, with one RNG call for the nonces."""
        check_batch(len(requests))
        if not requests:
            return []
        items = [
            (
                r.envelope.key.key_ring,
                r.envelope.key.version,
                r.envelope.nonce,
                r.envelope.ciphertext,
                r.binding.encode(),
                r.to_version,
            )
            for r in requests
        ]
        answers = await self.connection.request(Op.REWRAP, items)
        refs = _Refs()
        results: list[Envelope | HsmError] = []
        for item, answer in zip(items, answers, strict=True):
            if len(answer) == 2:
                results.append(_item_error(answer))
            else:
                version, nonce, sealed = answer
                results.append(Envelope(refs.get(item[0], version), nonce, sealed))
        return results

    async def seal_kms(
        self, key_ring: str, version: int | None, plaintext: bytes
    ) -> tuple[Envelope, VersionInfo]:
        """Seal a KMS v2 seed under ``version`` (None: the primary), bound to that version's
        key_id; one trip to the worker. Returns the envelope and the version used."""
        _check_plaintext(plaintext)
        info_wire, nonce, sealed = await self.connection.request(
            Op.SEAL, (key_ring, version, plaintext, None)
        )
        info = info_from_wire(info_wire)
        return Envelope(info.ref, nonce, sealed), info

    async def seal(
        self, key_ring: str, version: int | None, plaintext: bytes, binding_for: BindingFor
    ) -> Envelope:
        """Seal caller-supplied bytes. ``binding_for`` sees the chosen version (two trips: the
        version is resolved first; the KMS plugin uses :meth:`seal_kms`, one trip)."""
        _check_plaintext(plaintext)
        info = await self.version_info(key_ring, version)
        binding = binding_for(info).encode()
        info_wire, nonce, sealed = await self.connection.request(
            Op.SEAL, (key_ring, info.ref.version, plaintext, binding)
        )
        return Envelope(info_from_wire(info_wire).ref, nonce, sealed)


def _check_plaintext(plaintext: bytes) -> None:
    if not 0 < len(plaintext) <= MAX_PLAINTEXT_BYTES:
        raise HsmError(
            Reason.REQUEST_TOO_LARGE if plaintext else Reason.INVALID_ARGUMENT,
            f"plaintext is {len(plaintext)} bytes; allowed 1..{MAX_PLAINTEXT_BYTES}",
        )


BindingFor = Callable[[VersionInfo], Binding | KmsBinding]
