"""The unwrap RPC's bookkeeping (kustody.sidecar.unwrap.servicer) with fakes for the API and
the HSM: a call that is cancelled or runs out of time is never recorded as a success."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from kustody.client._proto import unwrap_pb2 as pb
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.domain.keyversion import KeyVersionRef
from kustody.sidecar.unwrap import audit
from kustody.sidecar.unwrap.datakeys import DataKeyGrant
from kustody.sidecar.unwrap.metrics import UnwrapMetrics
from kustody.sidecar.unwrap.ratelimit import RateLimiter
from kustody.sidecar.unwrap.servicer import UnwrapServicer
from kustody.sidecar.unwrap.tokens import Identity
from prometheus_client import CollectorRegistry

ME = Identity("shop", "api")


class Reviewer:
    async def authenticate(self, token: str, peer: str = "") -> Identity:
        return ME


class Directory:
    async def grant(self, namespace: str, name: str) -> DataKeyGrant:
        return DataKeyGrant("payments", frozenset({"api"}))


class Access:
    def __init__(self, allowed: bool | None = True) -> None:
        self.allowed_value = allowed

    async def allowed(self, key_ring: str, namespace: str) -> bool | None:
        return self.allowed_value


class Keys:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.finished: list[str] = []

    async def decrypt(self, envelope: Envelope, binding: Binding) -> bytes:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.finished.append("cancelled")
            raise
        self.finished.append("answered")
        return b"k" * 32


class Aborted(Exception):
    pass


class Context:
    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining
        self.aborted: tuple[Any, ...] | None = None

    def peer(self) -> str:
        return "ipv4:10.0.0.9:4000"

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", "Bearer x.y.z"),)

    def time_remaining(self) -> float | None:
        return self.remaining

    async def abort(self, code: grpc.StatusCode, details: str, trailing_metadata: Any) -> None:
        self.aborted = (code, details, trailing_metadata)
        raise Aborted


def request() -> pb.UnwrapRequest:
    wrapped = Envelope(KeyVersionRef("payments", 1), b"\0" * 12, b"\0" * 48).to_text()
    return pb.UnwrapRequest(wrapped=wrapped, key_ring="payments", namespace="shop", data_key="dk")


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    logger = logging.getLogger(audit.AUDIT_LOGGER)
    saved = (logger.handlers[:], logger.level, logger.propagate, audit._direct)
    logger.handlers = []
    out = io.StringIO()
    audit.configure(out)
    try:
        yield out
    finally:
        logger.handlers, logger.level, logger.propagate, audit._direct = saved


def servicer(keys: Keys, registry: CollectorRegistry, access: Access | None = None) -> Any:
    return UnwrapServicer(
        keys,  # type: ignore[arg-type]
        Reviewer(),  # type: ignore[arg-type]
        Directory(),  # type: ignore[arg-type]
        RateLimiter(100, 100),
        UnwrapMetrics(registry),
        access or Access(),  # type: ignore[arg-type]
    )


def _count(registry: CollectorRegistry, outcome: str) -> float:
    value = registry.get_sample_value(
        "kustody_unwrap_requests_total", {"namespace": "shop", "outcome": outcome}
    )
    return value or 0.0


@pytest.mark.parametrize(
    ("remaining", "reason"), [(3.0, "CANCELLED"), (-0.01, "DEADLINE_EXCEEDED")]
)
def test_a_cancelled_call_is_audited_as_cancelled_not_ok(
    lines: io.StringIO, remaining: float, reason: str
) -> None:
    registry = CollectorRegistry()

    async def run() -> None:
        keys = Keys()
        call = asyncio.create_task(servicer(keys, registry).Unwrap(request(), Context(remaining)))
        await keys.started.wait()  # authenticated, authorised, in the HSM
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        # The HSM request under it is not cancelled: it completes (and is dropped).
        keys.release.set()
        await asyncio.sleep(0.01)
        assert keys.finished == ["answered"]

    asyncio.run(run())
    record = json.loads(lines.getvalue())
    assert record["outcome"] == "cancelled"
    assert record["reason"] == reason
    assert record["data_key"] == "dk"
    assert _count(registry, "ok") == 0
    assert _count(registry, reason) == 1
    assert (
        registry.get_sample_value("kustody_unwrap_duration_seconds_count", {"result": "cancelled"})
        == 1
    )


def test_a_served_call_is_ok_and_a_revoked_namespace_is_refused(lines: io.StringIO) -> None:
    registry = CollectorRegistry()

    async def run() -> None:
        keys = Keys()
        keys.release.set()
        response = await servicer(keys, registry).Unwrap(request(), Context(3.0))
        assert response.plaintext == b"k" * 32
        context = Context(3.0)
        with pytest.raises(Aborted):
            await servicer(keys, CollectorRegistry(), Access(False)).Unwrap(request(), context)
        assert context.aborted is not None
        assert context.aborted[0] is grpc.StatusCode.PERMISSION_DENIED
        assert context.aborted[2] == (("kustody-reason", "NAMESPACE_NOT_ALLOWED"),)

    asyncio.run(run())
    ok, refused = (json.loads(line) for line in lines.getvalue().splitlines())
    assert (ok["outcome"], ok["reason"]) == ("ok", "")
    assert (refused["outcome"], refused["reason"]) == ("refused", "NAMESPACE_NOT_ALLOWED")
    assert _count(registry, "ok") == 1
