"""Envelope operations on top of the token, independent of any transport or caller policy.

Each method is a named operation in the PKCS#11 worker process (:mod:`kustody.pkcs11.worker`).
Only what the operation needs crosses the pipe: KeyRing, version, nonce, ciphertext, the
encoded binding (AAD) and plaintext only where the API returns or takes it.

Two things keep the two processes busy at once rather than taking turns:

* a batch is sent in chunks of :data:`CHUNK_ITEMS` as soon as each chunk is built, and its
  results are handed back chunk by chunk (:meth:`KeyService.generate_data_key_chunks`,
  :meth:`KeyService.rewrap_chunks`): the worker seals chunk *k* while the caller decodes chunk
  *k+1* or encodes chunk *k-1*; it is still one call (one gRPC request) for the caller;
* concurrent :meth:`KeyService.decrypt` calls, and concurrent :meth:`KeyService.seal_kms`
  calls, are coalesced into one worker request each (one frame each way instead of one per
  call; for seals also one C_GenerateRandom for all the nonces).

The operator's gRPC servicer, the KMS v2 plugin and the workload unwrap service
(:mod:`kustody.sidecar.unwrap`) all use this class; each applies its own policy (who may call what,
who may see plaintext) before calling it.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, TypeVar

from kustody.api.errors import HsmError, Reason, from_domain
from kustody.api.health import Health
from kustody.api.wire import Op
from kustody.domain.aad import Binding, KmsBinding, associated_data
from kustody.domain.envelope import MAX_DEK_BYTES, MAX_PLAINTEXT_BYTES, MIN_DEK_BYTES, Envelope
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import (
    KeyDescription,
    KeyVersionRef,
    VersionInfo,
    VersionState,
    settable,
    validate_key_ring,
)
from kustody.sidecar.connection import TokenLink, info_from_wire

DEFAULT_DEK_BYTES = 32
MAX_BATCH_ITEMS = 1000
# Items per worker request when a batch is sent in chunks: small enough that the worker starts
# early and the last chunk's answer comes soon after the worker is done, large enough that the
# per-request cost (a frame each way, one RNG call) stays small.
CHUNK_ITEMS = 32
FIRST_CHUNK_ITEMS = 8  # the first chunks are smaller (8, 16, then 32): the worker starts sooner
# Decrypt (and KMS seal) requests at the worker at once; more wait and then go together.
DECRYPTS_IN_FLIGHT = 1
SEALS_IN_FLIGHT = 1

T = TypeVar("T")
# What SetVersionState may set (DESTROYED only through DestroyVersion).


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


def _check_agent(fingerprint: str) -> None:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint):
        raise HsmError(
            Reason.INVALID_ARGUMENT, "an escrow agent fingerprint is 'sha256:' and 64 hex digits"
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


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """Lists of ``size`` items; the first ones smaller (``FIRST_CHUNK_ITEMS``, doubling), so
    the worker starts on a batch as soon as possible."""
    it = iter(items)
    step = min(size, FIRST_CHUNK_ITEMS)
    while part := list(islice(it, step)):
        yield part
        step = min(size, step * 2)


def _copy(error: BaseException) -> BaseException:
    """A fresh exception per waiter (one instance raised in several tasks would share and
    grow one traceback)."""
    if isinstance(error, HsmError):
        return HsmError(error.reason, error.message)
    return error


class _Shared:
    """One worker answer for several callers: item ``i`` of it goes to ``futures[i]``
    (a :class:`kustody.sidecar.connection.Waiter`); ``on_done`` runs exactly once, when the
    worker has answered (or the request failed or was cancelled as a whole).

    It is "done" only then — not when its callers have gone away: the connection skips
    delivering to a done waiter, and the queue's bookkeeping must hear about every answer,
    or a request whose every caller gave up would stay counted in flight for ever and hold
    back every later decrypt."""

    __slots__ = ("_finished", "futures", "on_done")

    def __init__(
        self, futures: list[asyncio.Future[Any]], on_done: Callable[[], None] | None = None
    ) -> None:
        self.futures = futures
        self.on_done = on_done
        self._finished = False

    def done(self) -> bool:
        return self._finished

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self.on_done is not None:
            self.on_done()

    def cancel(self) -> bool:
        for f in self.futures:
            f.cancel()
        self._finish()
        return True

    def set_result(self, answers: Any, /) -> None:
        for f, answer in zip(self.futures, answers, strict=True):
            if not f.done():
                f.set_result(answer)
        self._finish()

    def set_exception(self, exception: BaseException, /) -> None:
        for f in self.futures:
            if not f.done():
                f.set_exception(_copy(exception))
        self._finish()


class _Coalescer:
    """Concurrent calls of one batch operation (``op``: DECRYPT, or SEAL with a list) go to
    the worker together: at most ``max_in_flight`` such requests are at the worker; calls made
    meanwhile wait here and go as one request when one comes back. A call made while none is
    in flight is sent at once, so nothing waits for a timer; under load one frame each way
    carries several calls, which costs the event loop less than a frame (and a wake-up) per
    call.
    """

    def __init__(
        self, connection: TokenLink, op: Op, max_in_flight: int = DECRYPTS_IN_FLIGHT
    ) -> None:
        self._connection = connection
        self._op = op
        self._max_in_flight = max_in_flight
        self._loop: asyncio.AbstractEventLoop | None = None
        self._items: list[tuple[Any, ...]] = []
        self._futures: list[asyncio.Future[Any]] = []
        self._in_flight = 0

    def submit(self, item: tuple[Any, ...]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new loop (tests run one per call): nothing carries over
            _Shared(self._futures).cancel()
            self._items, self._futures, self._loop = [], [], loop
            self._in_flight = 0
        future: asyncio.Future[Any] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if self._in_flight < self._max_in_flight or len(self._items) >= MAX_BATCH_ITEMS:
            self._flush(force=True)
        return future

    def _flush(self, *, force: bool = False) -> None:
        items, futures = self._items, self._futures
        if not items or (self._in_flight >= self._max_in_flight and not force):
            return
        self._items, self._futures = [], []
        shared = _Shared(futures, self._answered)
        try:
            self._connection.submit(self._op, items, shared)
        except HsmError as exc:
            shared.on_done = None
            shared.set_exception(exc)
            return
        self._in_flight += 1

    def _answered(self) -> None:
        self._in_flight = max(0, self._in_flight - 1)
        if self._items:
            self._flush()


def _settle(futures: Iterable[asyncio.Future[Any] | None]) -> None:
    """Chunks nobody will await (an earlier one failed, or the caller went away): cancel the
    pending ones, and mark failed ones as seen (no "exception never retrieved" noise)."""
    for future in futures:
        if future is None:
            continue
        if not future.done():
            future.cancel()
        elif not future.cancelled():
            future.exception()


class KeyService:
    def __init__(
        self, connection: TokenLink, *, decrypts_in_flight: int = DECRYPTS_IN_FLIGHT
    ) -> None:
        """``decrypts_in_flight``: decrypt requests on their way to the worker at once; more
        than one where the way is long (an extra front end's relay), so that callers do not
        wait a whole round trip for the batch ahead of them."""
        self.connection = connection
        self._decrypts = _Coalescer(connection, Op.DECRYPT, decrypts_in_flight)
        self._seals = _Coalescer(connection, Op.SEAL, SEALS_IN_FLIGHT)
        self._infos: dict[Any, VersionInfo] = {}  # wire form -> VersionInfo (seal_kms answers)

    def _submit(self, op: Op, args: Any) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.connection.submit(op, args, future)
        return future

    # -- versions ----------------------------------------------------------------------------

    async def create_key_version(
        self, key_ring: str, version: int, *, escrow: bool = False
    ) -> VersionInfo:
        ref = _ref(key_ring, version)
        args = (ref.key_ring, ref.version, escrow)
        return info_from_wire(await self.connection.request(Op.CREATE, args))

    async def export_escrow(
        self, key_ring: str, version: int, agent_fingerprint: str
    ) -> tuple[bytes, str]:
        """(wrapped KEK, check value): the version wrapped by the token under the agent's key."""
        ref = _ref(key_ring, version)
        _check_agent(agent_fingerprint)
        wrapped, check_value = await self.connection.request(
            Op.EXPORT_ESCROW, (ref.key_ring, ref.version, agent_fingerprint)
        )
        return bytes(wrapped), str(check_value)

    async def escrow_agent_admitted(self, agent_fingerprint: str) -> bool:
        _check_agent(agent_fingerprint)
        return bool(await self.connection.request(Op.AGENT, (agent_fingerprint,)))

    async def set_version_state(
        self, key_ring: str, version: int, state: VersionState
    ) -> VersionInfo:
        ref = _ref(key_ring, version)
        try:
            settable(state)
        except DomainError as exc:
            raise from_domain(exc) from None
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
        """All items, sent to the worker in chunks, each chunk with one RNG call."""
        check_batch(len(requests))
        results: list[GeneratedKey | HsmError] = []
        async for chunk in self.generate_data_key_chunks(requests):
            results.extend(chunk)
        return results

    async def generate_data_key_chunks(
        self, requests: Iterable[GenerateRequest]
    ) -> AsyncIterator[list[GeneratedKey | HsmError]]:
        """Results in order, one list per chunk of :data:`CHUNK_ITEMS` requests.

        ``requests`` is consumed lazily: each chunk goes to the worker as soon as it has been
        taken from the iterable, before the next one is (so a caller that decodes items in a
        generator overlaps its decoding with the worker's sealing). The caller limits the
        count (:func:`check_batch`). A request-level failure (e.g. the token is lost) raises.
        """
        sent: list[tuple[list[GeneratedKey | HsmError | None], list[int], list[Any], Any]] = []
        try:
            for part in _chunks(requests, CHUNK_ITEMS):
                results: list[GeneratedKey | HsmError | None] = [None] * len(part)
                valid: list[int] = []
                items: list[tuple[str, int | None, int, bool, bytes]] = []
                for i, request in enumerate(part):
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
                future = self._submit(Op.GENERATE, items) if items else None
                sent.append((results, valid, items, future))
            for results, valid, items, future in sent:
                if future is not None:
                    generated = await future
                    refs = _Refs()
                    for i, item, answer in zip(valid, items, generated, strict=True):
                        if len(answer) == 2:
                            results[i] = _item_error(answer)
                            continue
                        version, nonce, sealed, plaintext = answer
                        envelope = Envelope(refs.get(item[0], version), nonce, sealed)
                        results[i] = GeneratedKey(envelope, plaintext)
                yield [r for r in results if r is not None]
        finally:
            _settle(future for *_, future in sent)

    async def decrypt(self, envelope: Envelope, binding: Binding | KmsBinding) -> bytes:
        """The plaintext of a wrapped key. Callers decide who may receive it.

        Concurrent calls are coalesced into one worker request (see :class:`_Coalescer`);
        each still gets its own result or its own error."""
        key = envelope.key
        aad = associated_data(envelope.header, binding)
        item = (key.key_ring, key.version, envelope.nonce, envelope.ciphertext, aad)
        answer = await self._decrypts.submit(item)
        if isinstance(answer, bytes):
            return answer
        raise _item_error(answer)

    async def rewrap(self, request: RewrapRequest) -> Envelope:
        (result,) = await self.rewrap_many([request])
        if isinstance(result, HsmError):
            raise result
        return result

    async def rewrap_many(self, requests: Sequence[RewrapRequest]) -> list[Envelope | HsmError]:
        """All items, sent to the worker in chunks, each chunk with one RNG call for its nonces."""
        check_batch(len(requests))
        results: list[Envelope | HsmError] = []
        async for chunk in self.rewrap_chunks(requests):
            results.extend(chunk)
        return results

    async def rewrap_chunks(
        self, requests: Iterable[RewrapRequest]
    ) -> AsyncIterator[list[Envelope | HsmError]]:
        """As :meth:`generate_data_key_chunks`, for rewraps."""
        sent: list[tuple[list[Any], Any]] = []
        try:
            for part in _chunks(requests, CHUNK_ITEMS):
                items = [
                    (
                        r.envelope.key.key_ring,
                        r.envelope.key.version,
                        r.envelope.nonce,
                        r.envelope.ciphertext,
                        r.binding.encode(),
                        r.to_version,
                    )
                    for r in part
                ]
                sent.append((items, self._submit(Op.REWRAP, items)))
            for items, future in sent:
                answers = await future
                refs = _Refs()
                results: list[Envelope | HsmError] = []
                for item, answer in zip(items, answers, strict=True):
                    if len(answer) == 2:
                        results.append(_item_error(answer))
                    else:
                        version, nonce, sealed = answer
                        results.append(Envelope(refs.get(item[0], version), nonce, sealed))
                yield results
        finally:
            _settle(future for _, future in sent)

    async def seal_kms(
        self, key_ring: str, version: int | None, plaintext: bytes
    ) -> tuple[Envelope, VersionInfo]:
        """Seal a KMS v2 seed under ``version`` (None: the primary), bound to that version's
        key_id. Returns the envelope and the version used.

        Concurrent calls are coalesced into one worker request (see :class:`_Coalescer`); each
        still gets its own result or its own error."""
        _check_plaintext(plaintext)
        answer = await self._seals.submit((key_ring, version, plaintext))
        if len(answer) == 2:
            raise _item_error(answer)
        info_wire, nonce, sealed = answer
        info = self._infos.get(info_wire)
        if info is None:
            if len(self._infos) >= 256:  # bounded: versions change rarely
                self._infos.clear()
            info = self._infos[info_wire] = info_from_wire(info_wire)
        return Envelope(info.ref, nonce, sealed), info


def _check_plaintext(plaintext: bytes) -> None:
    if not 0 < len(plaintext) <= MAX_PLAINTEXT_BYTES:
        raise HsmError(
            Reason.REQUEST_TOO_LARGE if plaintext else Reason.INVALID_ARGUMENT,
            f"plaintext is {len(plaintext)} bytes; allowed 1..{MAX_PLAINTEXT_BYTES}",
        )
