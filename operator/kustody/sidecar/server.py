"""The sidecar process: token connection, gRPC servers, KMS plugin, metrics, health loop."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from kustody.api._proto import keyservice_pb2_grpc, kms_v2_pb2_grpc
from kustody.api.errors import HsmError
from kustody.api.token import TokenConfig
from kustody.domain.keyversion import DEFAULT_MIN_DESTROY_DELAY_SECONDS
from kustody.sidecar.access import CertificateAccess, ClientRoles, LocalAccess
from kustody.sidecar.connection import HsmConnection
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.kms import KmsServicer
from kustody.sidecar.metrics import Metrics
from kustody.sidecar.servicer import KeyServiceServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
]


@dataclass(frozen=True)
class TlsConfig:
    """Server certificate and key, and the CA that client certificates must chain to."""

    cert: Path
    key: Path
    client_ca: Path


@dataclass(frozen=True)
class SidecarConfig:
    token: TokenConfig
    socket: Path | None = None
    listen: str | None = None  # host:port, served only with mTLS
    tls: TlsConfig | None = None
    # Who may call what over TCP (certificate identity -> role); required with ``listen``.
    client_roles: ClientRoles | None = None
    kms_socket: Path | None = None
    kms_key_ring: str | None = None
    kms_version: int | None = None  # None: the KeyRing's primary version
    kms_create_if_missing: bool = False
    metrics_port: int | None = None
    metrics_address: str = "127.0.0.1"
    health_interval: float = 5.0
    # Seconds a version must be DESTROY_SCHEDULED before DestroyVersion (tests: 0).
    min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS


def _bind_unix(server: grpc.aio.Server, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    server.add_insecure_port(f"unix:{path}")


class Sidecar:
    def __init__(self, config: SidecarConfig) -> None:
        if config.listen and config.tls is None:
            raise ValueError("TCP listening needs mTLS (server cert, key and client CA)")
        if config.listen and config.client_roles is None:
            raise ValueError(
                "TCP listening needs an allow-list of client certificate identities and their "
                "roles (--client-roles FILE)"
            )
        if config.kms_socket and not config.kms_key_ring:
            raise ValueError("the KMS socket needs a KeyRing (--kms-keyring)")
        self.config = config
        self.connection = HsmConnection(config.token, min_destroy_delay=config.min_destroy_delay)
        self.service = KeyService(self.connection)
        self.metrics = Metrics(self.connection)
        self.tcp_port: int | None = None
        self.kms: KmsServicer | None = None
        self._servers: list[grpc.aio.Server] = []
        self._metrics_server: Any = None
        self._health_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        health = await self.connection.start()
        if not health.serving:
            log.error("starting without a usable token: %s (%s)", health.message, health.reason)
        config = self.config
        # One server per transport, each with its own access policy: the unix socket is
        # trusted, TCP callers are authorised by their certificate (never by peer address).
        if config.socket:
            server = grpc.aio.server(options=_OPTIONS)
            keyservice_pb2_grpc.add_KeyServiceServicer_to_server(  # type: ignore[no-untyped-call]
                KeyServiceServicer(self.service, self.metrics, LocalAccess()), server
            )
            _bind_unix(server, config.socket)
            self._servers.append(server)
        if config.listen and config.tls and config.client_roles is not None:
            server = grpc.aio.server(options=_OPTIONS)
            keyservice_pb2_grpc.add_KeyServiceServicer_to_server(  # type: ignore[no-untyped-call]
                KeyServiceServicer(
                    self.service, self.metrics, CertificateAccess(config.client_roles)
                ),
                server,
            )
            self.tcp_port = server.add_secure_port(config.listen, _credentials(config.tls))
            self._servers.append(server)
        if config.kms_socket and config.kms_key_ring:
            self.kms = KmsServicer(
                self.service, self.metrics, config.kms_key_ring, config.kms_version
            )
            kms_server = grpc.aio.server(options=_OPTIONS)
            kms_v2_pb2_grpc.add_KeyManagementServiceServicer_to_server(  # type: ignore[no-untyped-call]
                self.kms, kms_server
            )
            _bind_unix(kms_server, config.kms_socket)
            self._servers.append(kms_server)
        for server in self._servers:
            await server.start()
        for path in (config.socket, config.kms_socket):
            if path:
                os.chmod(path, 0o600)
        if config.metrics_port is not None:
            self._metrics_server = self.metrics.serve(config.metrics_port, config.metrics_address)
        await self._ensure_kms_key()
        self._health_task = asyncio.create_task(self._health_loop())
        log.info(
            "HSM sidecar serving: socket=%s listen=%s kms=%s metrics=%s",
            config.socket,
            config.listen,
            config.kms_socket,
            config.metrics_port,
        )

    @property
    def metrics_port(self) -> int | None:
        if self._metrics_server is None:
            return None
        port: int = self._metrics_server.server_port
        return port

    async def _ensure_kms_key(self) -> None:
        ring = self.config.kms_key_ring
        if not (self.config.kms_create_if_missing and ring and self.connection.health.serving):
            return
        try:
            description = await self.service.describe_key(ring)
            if not description.versions:
                await self.service.create_key_version(ring, 1)
        except HsmError as exc:
            log.warning("could not create the first version of KeyRing %s: %s", ring, exc)

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.connection.check()
                await self._ensure_kms_key()
            except Exception:
                log.exception("health check failed")

    async def stop(self, grace: float = 1.0) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health_task
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        self._servers.clear()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        await self.connection.close()

    async def run(self, stop: asyncio.Event) -> None:
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def settle_heap() -> None:
    """Call once the process is serving: move everything alive now (imported modules, the
    Kubernetes client, protobuf descriptors: ~50k objects) out of the garbage collector's
    reach. Full collections then scan only what was allocated since, instead of pausing the
    event loop for 15-50 ms every few thousand requests (the p99.9 of unwrap was such pauses).
    """
    gc.collect()
    gc.freeze()


def _credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.key.read_bytes(), tls.cert.read_bytes())],
        root_certificates=tls.client_ca.read_bytes(),
        require_client_auth=True,
    )
