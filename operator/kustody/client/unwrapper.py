"""The workload side of unwrap: a small synchronous gRPC client with retries and a cache.

Imports only grpcio, protobuf and the standard library, so any Python workload can use it
without the operator's dependencies::

    from kustody.client import unwrap
    dek = unwrap("/var/run/secrets/kustody/datakey")   # bytes, 32 by default
"""

from __future__ import annotations

import base64
import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, cast

import grpc

from kustody.client._proto import unwrap_pb2 as pb
from kustody.client.errors import BACKOFF_REASONS, Reason, UnwrapError
from kustody.client.secretdir import (
    ENCRYPTION_CONTEXT,
    KEYSET,
    WRAPPED_KEY,
    WrappedKey,
    read_keyset_dir,
    read_secret_dir,
)

ENDPOINT_ENV = "KUSTODY_UNWRAP_ENDPOINT"
CA_FILE_ENV = "KUSTODY_UNWRAP_CA_FILE"
TOKEN_FILE_ENV = "KUSTODY_UNWRAP_TOKEN_FILE"  # noqa: S105 (names a file)
SERVER_NAME_ENV = "KUSTODY_UNWRAP_SERVER_NAME"
DEFAULT_TOKEN_FILE = "/var/run/secrets/kustody/token"  # noqa: S105 (a path)
DEFAULT_CA_FILE = "/var/run/secrets/kustody/ca.crt"
METHOD = "/kustody.workload.v1.Unwrap/Unwrap"
REASON_KEY = "kustody-reason"
# What unwrap_keyset returns, as kustody.client.keyset reads it (that module needs
# cryptography; the unwrapping side does not import it).
KEYSET_FILE_FORMAT = "kustody.io/keyset/v1"
_MAX_CACHE = 1024
_MAX_TOKEN_BYTES = 16 * 1024


@dataclass(frozen=True)
class Unwrapped:
    plaintext: bytes = field(repr=False)
    version: int


def _read_file(path: str, reason: Reason, what: str, limit: int = 1024 * 1024) -> bytes:
    try:
        with open(path, "rb") as fh:
            data = fh.read(limit + 1)
    except OSError as exc:
        raise UnwrapError(reason, f"cannot read the {what} {path}: {exc.strerror or exc}") from None
    if not data.strip() or len(data) > limit:
        raise UnwrapError(reason, f"the {what} {path} is empty or too large")
    return data


def _retryable(code: grpc.StatusCode | None, reason: str) -> bool:
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return True
    return code is grpc.StatusCode.RESOURCE_EXHAUSTED and reason in BACKOFF_REASONS


def error_from(exc: grpc.RpcError) -> UnwrapError:
    """The typed error a failed call stands for (reason from ``kustody-reason``)."""
    call = cast(Any, exc)
    code: grpc.StatusCode | None = call.code() if hasattr(call, "code") else None
    details: str = (call.details() if hasattr(call, "details") else None) or ""
    reason = ""
    trailing: Iterable[tuple[str, str | bytes]] = (
        call.trailing_metadata() if hasattr(call, "trailing_metadata") else None
    ) or ()
    for key, value in trailing:
        if key == REASON_KEY and isinstance(value, str):
            reason = value
    if not reason:
        unreachable = code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        reason = Reason.UNREACHABLE if unreachable else Reason.UNKNOWN
        details = f"{code.name if code else 'no status'}: {details}"
    return UnwrapError(reason, details, retryable=_retryable(code, reason))


class UnwrapClient:
    """Unwraps DataKey Secrets through the sidecar's workload service.

    * ``endpoint``: ``host:port`` (default ``$KUSTODY_UNWRAP_ENDPOINT``);
    * ``ca_file``: the CA that signed the sidecar's serving certificate
      (default ``$KUSTODY_UNWRAP_CA_FILE`` or ``/var/run/secrets/kustody/ca.crt``);
    * ``token_file``: the projected ServiceAccount token, audience ``kustody``, re-read on
      every call because the kubelet rotates it (default ``$KUSTODY_UNWRAP_TOKEN_FILE`` or
      ``/var/run/secrets/kustody/token``);
    * retries: up to ``attempts`` calls with exponential backoff and jitter on UNAVAILABLE,
      DEADLINE_EXCEEDED and the rate limits (``RATE_LIMITED``, ``PEER_RATE_LIMITED``,
      ``AUTH_RATE_LIMITED``, ``AUTH_BUSY``); never on a refusal;
    * cache: unwrapped keys stay in memory for ``cache_ttl`` seconds (``0`` disables), keyed
      by the whole wrapped key and binding, so a rewrapped Secret is fetched again.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        ca_file: str | Path | None = None,
        token_file: str | Path | None = None,
        server_name: str | None = None,
        timeout: float = 5.0,
        attempts: int = 6,
        backoff: float = 0.1,
        max_backoff: float = 3.0,
        cache_ttl: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        env = os.environ.get
        self.endpoint = endpoint or env(ENDPOINT_ENV) or ""
        self.ca_file = str(ca_file or env(CA_FILE_ENV) or DEFAULT_CA_FILE)
        self.token_file = str(token_file or env(TOKEN_FILE_ENV) or DEFAULT_TOKEN_FILE)
        self.server_name = server_name or env(SERVER_NAME_ENV) or None
        self.timeout = timeout
        self.attempts = max(1, attempts)
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.cache_ttl = cache_ttl
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._cache: dict[WrappedKey, tuple[float, Unwrapped]] = {}
        self._channel: grpc.Channel | None = None
        self._call: Any = None

    # -- public API --------------------------------------------------------------------------

    def unwrap(
        self,
        secret_dir: str | Path,
        *,
        wrapped_key: str = WRAPPED_KEY,
        encryption_context: str = ENCRYPTION_CONTEXT,
    ) -> bytes:
        """The plaintext DEK of the DataKey Secret mounted at ``secret_dir``."""
        key = read_secret_dir(
            secret_dir, wrapped_key=wrapped_key, encryption_context=encryption_context
        )
        return self.unwrap_key(key).plaintext

    def unwrap_keyset(
        self,
        secret_dir: str | Path,
        *,
        keyset: str = KEYSET,
        wrapped_key: str = WRAPPED_KEY,
        encryption_context: str = ENCRYPTION_CONTEXT,
    ) -> bytes | None:
        """The DataKey's whole keyset with every generation's DEK, as the keyset file
        ``kustody.client.Keyset`` reads (JSON, ``kustody.io/keyset/v1``; it holds plaintext
        keys: keep it on a memory filesystem). None when the Secret has no keyset entry."""
        return self.unwrap_all(
            secret_dir, keyset=keyset, wrapped_key=wrapped_key,
            encryption_context=encryption_context,
        )[1]  # fmt: skip

    def unwrap_all(
        self,
        secret_dir: str | Path,
        *,
        keyset: str = KEYSET,
        wrapped_key: str = WRAPPED_KEY,
        encryption_context: str = ENCRYPTION_CONTEXT,
    ) -> tuple[bytes, bytes | None]:
        """One call: the primary DEK, and the keyset file (None without a keyset entry)."""
        wrapped = read_keyset_dir(
            secret_dir,
            keyset=keyset,
            wrapped_key=wrapped_key,
            encryption_context=encryption_context,
        )
        if wrapped is None:
            return self.unwrap(
                secret_dir, wrapped_key=wrapped_key, encryption_context=encryption_context
            ), None
        request = self._request(wrapped.key)
        for g in wrapped.generations:
            request.generations.add(
                key_id=g.key_id, generation=g.generation, primary=g.primary, wrapped=g.wrapped
            )
        response = self._retrying(request)
        primary = next((k for k in response.keys if k.primary), None)
        if primary is None or len(response.keys) != len(wrapped.generations):
            raise UnwrapError(Reason.UNKNOWN, "the sidecar did not return the whole keyset")
        document = json.dumps(
            {
                "format": KEYSET_FILE_FORMAT,
                "dataKey": {"namespace": wrapped.key.namespace, "name": wrapped.key.data_key},
                "primaryKeyId": primary.key_id,
                "keys": [
                    {
                        "keyId": k.key_id,
                        "generation": k.generation,
                        "status": "Primary" if k.primary else "DecryptOnly",
                        "key": base64.b64encode(k.plaintext).decode("ascii"),
                    }
                    for k in response.keys
                ],
            },
            separators=(",", ":"),
        ).encode()
        return response.plaintext, document

    def unwrap_key(self, key: WrappedKey) -> Unwrapped:
        cached = self._cached(key)
        if cached is not None:
            return cached
        result = self._with_retries(key)
        if self.cache_ttl > 0:
            with self._lock:
                if len(self._cache) >= _MAX_CACHE:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[key] = (self._clock() + self.cache_ttl, result)
        return result

    def clear_cache(self) -> None:
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        with self._lock:
            channel, self._channel, self._call = self._channel, None, None
        if channel is not None:
            channel.close()

    def __enter__(self) -> UnwrapClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _cached(self, key: WrappedKey) -> Unwrapped | None:
        with self._lock:
            entry = self._cache.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._cache[key]
                return None
            return entry[1]

    @staticmethod
    def _request(key: WrappedKey) -> pb.UnwrapRequest:
        return pb.UnwrapRequest(
            wrapped=key.wrapped,
            key_ring=key.key_ring,
            namespace=key.namespace,
            data_key=key.data_key,
            encryption_context=key.context,
        )

    def _with_retries(self, key: WrappedKey) -> Unwrapped:
        response = self._retrying(self._request(key))
        return Unwrapped(response.plaintext, response.version)

    def _retrying(self, request: pb.UnwrapRequest) -> pb.UnwrapResponse:
        for attempt in range(self.attempts):
            try:
                return self._once(request)
            except UnwrapError as exc:
                if not exc.retryable or attempt == self.attempts - 1:
                    raise
                delay = min(self.max_backoff, self.backoff * 2**attempt)
                self._sleep(delay * random.uniform(0.5, 1.0))  # noqa: S311 (jitter)
        raise AssertionError("unreachable")  # pragma: no cover

    def _once(self, request: pb.UnwrapRequest) -> pb.UnwrapResponse:
        token = _read_file(
            self.token_file, Reason.TOKEN_FILE_UNREADABLE, "token file", _MAX_TOKEN_BYTES
        )
        metadata = (("authorization", "Bearer " + token.decode("ascii", "replace").strip()),)
        try:
            response: pb.UnwrapResponse = self._stub()(
                request, timeout=self.timeout, metadata=metadata
            )
        except grpc.RpcError as exc:
            raise error_from(exc) from None
        return response

    def _stub(self) -> Any:
        with self._lock:
            if self._call is None:
                if not self.endpoint:
                    raise UnwrapError(
                        Reason.NO_ENDPOINT, f"no endpoint: pass one or set ${ENDPOINT_ENV}"
                    )
                ca = _read_file(self.ca_file, Reason.CA_UNREADABLE, "CA file")
                options: list[tuple[str, Any]] = []
                if self.server_name:
                    options.append(("grpc.ssl_target_name_override", self.server_name))
                self._channel = grpc.secure_channel(
                    self.endpoint, grpc.ssl_channel_credentials(root_certificates=ca), options
                )
                self._call = self._channel.unary_unary(
                    METHOD,
                    request_serializer=pb.UnwrapRequest.SerializeToString,
                    response_deserializer=pb.UnwrapResponse.FromString,
                )
            return self._call


_default: UnwrapClient | None = None
_default_lock = threading.Lock()


def default_client() -> UnwrapClient:
    """One client per process, configured from the environment (so its cache is shared)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = UnwrapClient()
        return _default


def unwrap(
    secret_dir: str | Path,
    *,
    wrapped_key: str = WRAPPED_KEY,
    encryption_context: str = ENCRYPTION_CONTEXT,
) -> bytes:
    """The plaintext DEK of the DataKey Secret mounted at ``secret_dir`` (default client)."""
    return default_client().unwrap(
        secret_dir, wrapped_key=wrapped_key, encryption_context=encryption_context
    )
