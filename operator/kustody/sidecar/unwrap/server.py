"""The workload service: a TLS gRPC server in the sidecar's front end, next to its key service
(and, with ``--workload-front-ends``, in each extra front end)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from prometheus_client import CollectorRegistry

from kustody.client.errors import Reason
from kustody.kube.api import Kube
from kustody.kube.errors import KubeError
from kustody.kube.resources import DATAKEYS, KEYRINGS, NAMESPACES, Resource
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.unwrap.datakeys import DataKeyDirectory, NamespaceAccess
from kustody.sidecar.unwrap.metrics import UnwrapMetrics
from kustody.sidecar.unwrap.ratelimit import RateLimiter
from kustody.sidecar.unwrap.refusal import Refusal
from kustody.sidecar.unwrap.servicer import UnwrapServicer
from kustody.sidecar.unwrap.tokens import ReviewLimits, TokenReviewer

log = logging.getLogger(__name__)

TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"  # noqa: S105 (an API path)
_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024),
    ("grpc.max_send_message_length", 64 * 1024),
]


@dataclass(frozen=True)
class WorkloadConfig:
    listen: str  # host:port, TLS only
    tls_cert: Path
    tls_key: Path
    audience: str = "kustody"
    rate: float = 100.0  # per ServiceAccount, per second
    burst: float = 200.0
    review_ttl: float = 300.0  # at most; never past the token's exp
    negative_ttl: float = 5.0
    datakey_ttl: float = 5.0  # DataKeys, KeyRings and Namespace labels
    # Before a TokenReview (tokens in neither cache): per client address, in total, in flight
    review_limits: ReviewLimits = field(default_factory=ReviewLimits)
    review_cache_size: int = 10_000  # successful reviews
    refusal_cache_size: int = 4_096  # reviews that said no (a separate cache)


class KubeAccess:
    """TokenReview and DataKey, KeyRing and Namespace GETs through :class:`Kube`; API
    failures become ``AUTH_UNAVAILABLE`` refusals (retryable: the caller's client backs off).

    RBAC the sidecar's identity needs: ``create`` tokenreviews (authentication.k8s.io),
    ``get`` datakeys and keyrings (kustody.io), ``get`` namespaces (core)."""

    def __init__(self, kube: Kube) -> None:
        self._kube = kube

    async def review(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token, "audiences": list(audiences)},
        }
        try:
            result = await self._kube.request("POST", TOKEN_REVIEWS, body=body, kind="TokenReview")
        except KubeError as exc:
            raise Refusal(
                Reason.AUTH_UNAVAILABLE, f"TokenReview failed: {exc.status} {exc.reason}"
            ) from None
        status: Mapping[str, Any] = result.get("status") or {}
        return status

    async def _get(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> Mapping[str, Any] | None:
        try:
            return await self._kube.get_or_none(res, name, namespace)
        except KubeError as exc:
            raise Refusal(
                Reason.AUTH_UNAVAILABLE,
                f"reading {res.kind}s failed: {exc.status} {exc.reason}",
            ) from None

    async def datakey(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        return await self._get(DATAKEYS, name, namespace)

    async def keyring(self, name: str) -> Mapping[str, Any] | None:
        return await self._get(KEYRINGS, name)

    async def namespace(self, name: str) -> Mapping[str, Any] | None:
        return await self._get(NAMESPACES, name)


class WorkloadServer:
    def __init__(
        self,
        config: WorkloadConfig,
        keys: KeyService,
        registry: CollectorRegistry,
        kube: Kube,
        *,
        reuse_port: bool = False,
    ) -> None:
        self.config = config
        # SO_REUSEPORT only where several front ends share the port on purpose; otherwise a
        # second process binding it (of the same user) fails instead of taking connections.
        self._options = [*_OPTIONS, ("grpc.so_reuseport", 1 if reuse_port else 0)]
        access = KubeAccess(kube)
        metrics = UnwrapMetrics(registry)
        self.reviewer = TokenReviewer(
            access.review,
            audience=config.audience,
            max_ttl=config.review_ttl,
            negative_ttl=config.negative_ttl,
            max_entries=config.review_cache_size,
            max_refusals=config.refusal_cache_size,
            limits=config.review_limits,
            on_review=metrics.review,
        )
        metrics.reviews_in_flight.set_function(lambda: self.reviewer.in_flight)
        self.directory = DataKeyDirectory(access.datakey, ttl=config.datakey_ttl)
        self.access = NamespaceAccess(access.keyring, access.namespace, ttl=config.datakey_ttl)
        self.limiter = RateLimiter(config.rate, config.burst)
        self.servicer = UnwrapServicer(
            keys, self.reviewer, self.directory, self.limiter, metrics, self.access
        )
        self.port: int | None = None
        self._server: grpc.aio.Server | None = None

    async def start(self) -> None:
        server = grpc.aio.server(options=self._options)
        server.add_generic_rpc_handlers((self.servicer.handler(),))
        credentials = grpc.ssl_server_credentials(
            [(self.config.tls_key.read_bytes(), self.config.tls_cert.read_bytes())]
        )
        self.port = server.add_secure_port(self.config.listen, credentials)
        await server.start()
        self._server = server
        log.info("workload unwrap service listening on %s (TLS)", self.config.listen)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
