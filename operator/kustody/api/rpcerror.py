"""HsmError ⇄ gRPC status: a status code plus the stable reason in trailing metadata."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NoReturn, cast

import grpc
import grpc.aio

from kustody.api.errors import HsmError, Reason

Context = grpc.aio.ServicerContext[Any, Any]

REASON_KEY = "kustody-reason"

CODES: dict[Reason, grpc.StatusCode] = {
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.MALFORMED_ENVELOPE: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.AAD_MISMATCH: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.VERSION_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.VERSION_DISABLED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.VERSION_DESTROYED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.VERSION_NOT_DISABLED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.NO_PRIMARY_VERSION: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.DESTRUCTION_NOT_DUE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.KEY_NOT_TRUSTED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.PLAINTEXT_EXPORT_FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED,
    Reason.REQUEST_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.TOKEN_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.TOKEN_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.MODULE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.TOKEN_NOT_FOUND: grpc.StatusCode.UNAVAILABLE,
    Reason.PIN_INCORRECT: grpc.StatusCode.UNAVAILABLE,
    Reason.PIN_FILE_UNREADABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.TOKEN_LOST: grpc.StatusCode.UNAVAILABLE,
    Reason.WORKER_LOST: grpc.StatusCode.UNAVAILABLE,
    Reason.TOKEN_INCOMPATIBLE: grpc.StatusCode.UNAVAILABLE,
    Reason.ESCROW_AGENT_NOT_ADMITTED: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.VERSION_NOT_ESCROWABLE: grpc.StatusCode.FAILED_PRECONDITION,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
}


async def abort(context: grpc.aio.ServicerContext[Any, Any], error: HsmError) -> NoReturn:
    await context.abort(
        CODES.get(error.reason, grpc.StatusCode.INTERNAL),
        error.message,
        trailing_metadata=((REASON_KEY, str(error.reason)),),
    )


def from_rpc_error(exc: grpc.RpcError) -> HsmError:
    """The typed error a failed call stands for (for clients)."""
    code: grpc.StatusCode | None = exc.code() if hasattr(exc, "code") else None
    details: str = (exc.details() if hasattr(exc, "details") else None) or ""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    pairs = cast(Iterable[tuple[str, str | bytes]], trailing or ())
    for key, value in pairs:
        if key == REASON_KEY and isinstance(value, str):
            try:
                return HsmError(Reason(value), details)
            except ValueError:
                break
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        # gRPC's own message-size limit, before any Kustody code saw the request.
        return HsmError(Reason.REQUEST_TOO_LARGE, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return HsmError(Reason.TOKEN_UNAVAILABLE, f"the HSM sidecar is unreachable: {details}")
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return HsmError(Reason.INVALID_ARGUMENT, details)
    return HsmError(Reason.INTERNAL, f"{code}: {details}")
