"""``kustody.workload.v1.Unwrap/Unwrap``: authenticate, rate-limit, authorise, decrypt, audit.

The decrypt itself is :meth:`kustody.sidecar.keyservice.KeyService.decrypt` (policy-free); the
policy is here: the token's namespace must be the binding's (AAD) namespace, the
ServiceAccount must be one of the DataKey's ``spec.consumers``, and the KeyRing must still
allow the namespace.

The outcome recorded (audit line, metrics) starts as ``CANCELLED`` and becomes ``ok`` only
once the response is built: a call cancelled by its caller or past its deadline
(``asyncio.CancelledError`` at any ``await``) is recorded as ``cancelled`` with reason
``CANCELLED`` or ``DEADLINE_EXCEEDED``, never as a success.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable
from typing import Any

import grpc
import grpc.aio

from kustody.api.errors import HsmError, from_domain
from kustody.client._proto import unwrap_pb2 as pb
from kustody.client.errors import Reason
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.unwrap import audit
from kustody.sidecar.unwrap.datakeys import DataKeyDirectory, NamespaceAccess
from kustody.sidecar.unwrap.metrics import UnwrapMetrics
from kustody.sidecar.unwrap.policy import check_grant, check_keyring_allows, check_namespace
from kustody.sidecar.unwrap.ratelimit import RateLimiter
from kustody.sidecar.unwrap.refusal import Refusal, abort
from kustody.sidecar.unwrap.tokens import Identity, TokenReviewer

log = logging.getLogger(__name__)

SERVICE = "kustody.workload.v1.Unwrap"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
_BEARER = "bearer "
MAX_GENERATIONS = 256  # keyset entries unwrapped in one call


def bearer_token(metadata: Iterable[tuple[str, str | bytes]] | None) -> str:
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            if value[: len(_BEARER)].lower() == _BEARER and value[len(_BEARER) :].strip():
                return value[len(_BEARER) :].strip()
            break
    raise Refusal(
        Reason.TOKEN_MISSING, "no 'authorization: Bearer <ServiceAccount token>' metadata"
    )


def parse_request(request: pb.UnwrapRequest) -> tuple[Envelope, Binding]:
    if not _DNS_LABEL.match(request.namespace):
        raise Refusal(Reason.INVALID_ARGUMENT, "namespace is not a valid namespace name")
    if not _DNS_SUBDOMAIN.match(request.data_key):
        raise Refusal(Reason.INVALID_ARGUMENT, "data_key is not a valid DataKey name")
    try:
        envelope = Envelope.from_text(request.wrapped)
        binding = Binding(request.namespace, request.data_key, dict(request.encryption_context))
    except DomainError as exc:
        raise Refusal.from_hsm(from_domain(exc)) from None
    if request.key_ring and request.key_ring != envelope.key.key_ring:
        raise Refusal(
            Reason.INVALID_ARGUMENT,
            f"key_ring {request.key_ring!r} is not the envelope's KeyRing",
        )
    return envelope, binding


def parse_generations(
    request: pb.UnwrapRequest, key_ring: str
) -> list[tuple[pb.WrappedGeneration, Envelope]]:
    """The keyset's envelopes: all of the one KeyRing the primary names (the AAD binds each
    to the same namespace and DataKey, so one authorisation covers them all)."""
    if len(request.generations) > MAX_GENERATIONS:
        raise Refusal(
            Reason.INVALID_ARGUMENT, f"more than {MAX_GENERATIONS} generations in one request"
        )
    out = []
    for item in request.generations:
        try:
            envelope = Envelope.from_text(item.wrapped)
        except DomainError as exc:
            raise Refusal.from_hsm(from_domain(exc)) from None
        if envelope.key.key_ring != key_ring:
            raise Refusal(
                Reason.INVALID_ARGUMENT,
                f"generation {item.generation} is not wrapped under KeyRing {key_ring}",
            )
        out.append((item, envelope))
    return out


class UnwrapServicer:
    def __init__(
        self,
        keys: KeyService,
        reviewer: TokenReviewer,
        directory: DataKeyDirectory,
        limiter: RateLimiter,
        metrics: UnwrapMetrics,
        access: NamespaceAccess,
    ) -> None:
        self._keys = keys
        self._reviewer = reviewer
        self._directory = directory
        self._limiter = limiter
        self._metrics = metrics
        self._access = access

    def handler(self) -> grpc.GenericRpcHandler[Any, Any]:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unwrap": grpc.unary_unary_rpc_method_handler(
                    self.Unwrap,
                    request_deserializer=pb.UnwrapRequest.FromString,
                    response_serializer=pb.UnwrapResponse.SerializeToString,
                )
            },
        )

    async def Unwrap(
        self, request: pb.UnwrapRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.UnwrapResponse:
        start = time.perf_counter()
        identity: Identity | None = None
        key_ring, version = request.key_ring, 0
        peer = context.peer() or ""
        # Not ok until the response exists: a cancellation at any await leaves it so.
        outcome: str = Reason.CANCELLED
        try:
            identity = await self._reviewer.authenticate(
                bearer_token(context.invocation_metadata()), peer
            )
            if not self._limiter.allow(identity.key):
                raise Refusal(
                    Reason.RATE_LIMITED,
                    f"more than {self._limiter.rate:g}/s (burst {self._limiter.burst:g}) "
                    f"for {identity.key}; retry with backoff",
                )
            envelope, binding = parse_request(request)
            key_ring, version = envelope.key.key_ring, envelope.key.version
            generations = parse_generations(request, key_ring)
            check_namespace(identity, request.namespace)
            grant = await self._directory.grant(identity.namespace, request.data_key)
            check_grant(identity, request.data_key, key_ring, grant)
            allowed = await self._access.allowed(key_ring, identity.namespace)
            check_keyring_allows(identity, key_ring, allowed)
            try:
                # Shielded: a caller that goes away must not cancel the HSM request under it.
                # The worker does the work anyway, and concurrent decrypts share one worker
                # request whose bookkeeping (kustody.sidecar.keyservice._Coalescer) is only
                # released when an answer is delivered to a waiter that is not done — a
                # cancelled sole waiter would leave every later decrypt queued for ever.
                plaintexts = await asyncio.shield(
                    asyncio.gather(
                        self._keys.decrypt(envelope, binding),
                        *(self._keys.decrypt(e, binding) for _, e in generations),
                    )
                )
            except HsmError as exc:
                raise Refusal.from_hsm(exc) from None
            response = pb.UnwrapResponse(plaintext=plaintexts[0], version=version)
            for (item, _), key in zip(generations, plaintexts[1:], strict=True):
                response.keys.add(
                    key_id=item.key_id,
                    generation=item.generation,
                    primary=item.primary,
                    plaintext=key,
                )
            outcome = "ok"
            return response
        except Refusal as refusal:
            outcome = refusal.reason
            await abort(context, refusal)
        except asyncio.CancelledError:
            outcome = _cancelled_reason(context)
            raise
        except Exception:
            outcome = str(Reason.UNKNOWN)
            log.exception("unwrap failed unexpectedly")
            await abort(context, Refusal("INTERNAL", "unwrap failed; see the sidecar log"))
        finally:
            seconds = time.perf_counter() - start
            namespace = identity.namespace if identity else ""
            self._metrics.observe(namespace, outcome, seconds)
            audit.emit(
                audit.AuditRecord(
                    namespace=namespace,
                    service_account=identity.service_account if identity else "",
                    pod=identity.pod if identity else "",
                    request_namespace=request.namespace,
                    data_key=request.data_key,
                    key_ring=key_ring,
                    version=version,
                    outcome=audit.outcome_of(outcome),
                    reason="" if outcome == "ok" else outcome,
                    latency_ms=round(seconds * 1000, 3),
                    peer=peer,
                )
            )


def _cancelled_reason(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """``DEADLINE_EXCEEDED`` when the caller's deadline has passed, else ``CANCELLED``."""
    try:
        remaining = context.time_remaining()
    except Exception:  # (a context that no longer knows) — cancelled is what we know
        remaining = None
    if remaining is not None and remaining <= 0:
        return str(Reason.DEADLINE_EXCEEDED)
    return str(Reason.CANCELLED)
