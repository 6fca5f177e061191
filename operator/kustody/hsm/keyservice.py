"""Envelope operations on top of the token, independent of any transport or caller policy.

The operator's gRPC servicer, the KMS v2 plugin and (later) an authenticated workload service
all use this class; each applies its own policy (who may see plaintext) before calling it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kustody.domain.aad import Binding, KmsBinding, associated_data
from kustody.domain.envelope import MAX_PLAINTEXT_BYTES, NONCE_BYTES, Envelope, header_for
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import KeyVersionRef, VersionInfo, VersionState, validate_key_ring
from kustody.hsm.connection import Health, HsmConnection
from kustody.hsm.errors import HsmError, Reason, from_domain
from kustody.hsm.kekstore import KekStore

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


class KeyService:
    def __init__(self, connection: HsmConnection) -> None:
        self.connection = connection

    # -- versions ----------------------------------------------------------------------------

    async def create_key_version(self, key_ring: str, version: int) -> VersionInfo:
        ref = _ref(key_ring, version)
        return await self.connection.run(lambda s: s.create(ref))

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo:
        ref = _ref(key_ring, version)
        return await self.connection.run(lambda s: s.set_state(ref, state))

    async def destroy_version(self, key_ring: str, version: int) -> VersionInfo:
        ref = _ref(key_ring, version)
        return await self.connection.run(lambda s: s.destroy(ref))

    async def describe_key(self, key_ring: str) -> KeyDescription:
        try:
            validate_key_ring(key_ring)
        except DomainError as exc:
            raise from_domain(exc) from None

        def describe(store: KekStore) -> KeyDescription:
            return KeyDescription(
                key_ring, store.primary(key_ring), tuple(store.versions(key_ring))
            )

        return await self.connection.run(describe)

    async def version_info(self, key_ring: str, version: int | None) -> VersionInfo:
        return await self.connection.run(lambda s: s.info(s.resolve(key_ring, version)))

    async def health(self) -> Health:
        return await self.connection.check()

    # -- data keys ---------------------------------------------------------------------------

    async def generate_data_key(self, request: GenerateRequest) -> GeneratedKey:
        _checked_length(request.length)
        return await self.connection.run(lambda s: self._generate(s, request))

    async def generate_data_keys(
        self, requests: Sequence[GenerateRequest]
    ) -> list[GeneratedKey | HsmError]:
        """All items in one trip to the PKCS#11 thread, with one RNG call for the batch."""
        check_batch(len(requests))
        results: list[GeneratedKey | HsmError | None] = [None] * len(requests)
        valid: list[int] = []
        for i, request in enumerate(requests):
            try:
                _checked_length(request.length)
                valid.append(i)
            except HsmError as exc:
                results[i] = exc
        batch = [requests[i] for i in valid]
        generated = await self.connection.run(lambda s: self._generate_batch(s, batch))
        for i, key in zip(valid, generated, strict=True):
            results[i] = key
        return [r for r in results if r is not None]

    async def decrypt(self, envelope: Envelope, binding: Binding | KmsBinding) -> bytes:
        """The plaintext of a wrapped key. Callers decide who may receive it."""
        return await self.connection.run(lambda s: self._unseal(s, envelope, binding))

    async def rewrap(self, request: RewrapRequest) -> Envelope:
        return await self.connection.run(lambda s: self._rewrap(s, request))

    async def rewrap_many(self, requests: Sequence[RewrapRequest]) -> list[Envelope | HsmError]:
        """All items in one trip to the PKCS#11 thread, with one RNG call for the nonces."""
        check_batch(len(requests))
        return await self.connection.run(lambda s: self._rewrap_batch(s, requests))

    async def seal(
        self, key_ring: str, version: int | None, plaintext: bytes, binding_for: BindingFor
    ) -> Envelope:
        """Seal caller-supplied bytes (KMS v2 seeds). ``binding_for`` sees the chosen version."""
        if not 0 < len(plaintext) <= MAX_PLAINTEXT_BYTES:
            raise HsmError(
                Reason.REQUEST_TOO_LARGE if plaintext else Reason.INVALID_ARGUMENT,
                f"plaintext is {len(plaintext)} bytes; allowed 1..{MAX_PLAINTEXT_BYTES}",
            )

        def seal(store: KekStore) -> Envelope:
            ref = store.resolve(key_ring, version)
            binding = binding_for(store.info(ref))
            nonce, sealed = store.seal(ref, plaintext, associated_data(header_for(ref), binding))
            return Envelope(ref, nonce, sealed)

        return await self.connection.run(seal)

    # -- on the PKCS#11 thread ---------------------------------------------------------------

    @staticmethod
    def _generate(store: KekStore, request: GenerateRequest) -> GeneratedKey:
        length = _checked_length(request.length)
        ref = store.resolve(request.key_ring, request.version)
        aad = associated_data(header_for(ref), request.binding)
        dek, nonce, sealed = store.generate(ref, length, aad)
        return GeneratedKey(
            Envelope(ref, nonce, sealed), dek if request.include_plaintext else None
        )

    @staticmethod
    def _generate_batch(
        store: KekStore, requests: Sequence[GenerateRequest]
    ) -> list[GeneratedKey | HsmError]:
        """Per-item results; a lost token (TokenLost) still aborts the whole batch.

        One C_GenerateRandom yields nonce ‖ DEK for every item (disjoint slices); then one
        C_EncryptInit + C_Encrypt per item. Resolution and key lookup happen once per version.
        """
        keys = _Keys(store)
        rnd = store.random(sum(NONCE_BYTES + r.length for r in requests)) if requests else b""
        results: list[GeneratedKey | HsmError] = []
        offset = 0
        for request in requests:
            end = offset + NONCE_BYTES + request.length
            nonce, dek = rnd[offset : offset + NONCE_BYTES], rnd[offset + NONCE_BYTES : end]
            offset = end
            try:
                ref, key, header = keys.get(request.key_ring, request.version)
                sealed = store.encrypt(
                    key, ref, dek, nonce, associated_data(header, request.binding)
                )
                results.append(
                    GeneratedKey(
                        Envelope(ref, nonce, sealed), dek if request.include_plaintext else None
                    )
                )
            except HsmError as exc:
                results.append(exc)
            except DomainError as exc:
                results.append(from_domain(exc))
        return results

    @staticmethod
    def _rewrap_batch(
        store: KekStore, requests: Sequence[RewrapRequest]
    ) -> list[Envelope | HsmError]:
        """Unseal + reseal per item; one C_GenerateRandom for all the new nonces."""
        keys = _Keys(store)
        rnd = store.random(NONCE_BYTES * len(requests)) if requests else b""
        results: list[Envelope | HsmError] = []
        for i, request in enumerate(requests):
            nonce = rnd[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            old = request.envelope
            try:
                from_ref, from_key, from_header = keys.get(old.key.key_ring, old.key.version)
                plaintext = store.decrypt(
                    from_key,
                    from_ref,
                    old.nonce,
                    old.ciphertext,
                    associated_data(from_header, request.binding),
                )
                ref, key, header = keys.get(old.key.key_ring, request.to_version)
                sealed = store.encrypt(
                    key, ref, plaintext, nonce, associated_data(header, request.binding)
                )
                results.append(Envelope(ref, nonce, sealed))
            except HsmError as exc:
                results.append(exc)
            except DomainError as exc:
                results.append(from_domain(exc))
        return results

    @staticmethod
    def _unseal(store: KekStore, envelope: Envelope, binding: Binding | KmsBinding) -> bytes:
        aad = associated_data(envelope.header, binding)
        return store.unseal(envelope.key, envelope.nonce, envelope.ciphertext, aad)

    @classmethod
    def _rewrap(cls, store: KekStore, request: RewrapRequest) -> Envelope:
        plaintext = cls._unseal(store, request.envelope, request.binding)
        ref = store.resolve(request.envelope.key.key_ring, request.to_version)
        nonce, sealed = store.seal(
            ref, plaintext, associated_data(header_for(ref), request.binding)
        )
        return Envelope(ref, nonce, sealed)


class _Keys:
    """Per-batch cache: (KeyRing, version or None) -> (ref, key object, header) or the error."""

    def __init__(self, store: KekStore) -> None:
        self._store = store
        self._cache: dict[tuple[str, int | None], tuple[KeyVersionRef, Any, bytes] | HsmError] = {}

    def get(self, key_ring: str, version: int | None) -> tuple[KeyVersionRef, Any, bytes]:
        found = self._cache.get((key_ring, version))
        if found is None:
            try:
                ref = self._store.resolve(key_ring, version)
                found = (ref, self._store.usable_key(ref), header_for(ref))
            except HsmError as exc:
                found = exc
            except DomainError as exc:
                found = from_domain(exc)
            self._cache[(key_ring, version)] = found
        if isinstance(found, HsmError):
            raise found
        return found


BindingFor = Callable[[VersionInfo], Binding | KmsBinding]
