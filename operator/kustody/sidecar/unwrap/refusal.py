"""A refused or failed unwrap: a stable reason and the gRPC status code it travels as."""

from __future__ import annotations

from typing import Any, NoReturn

import grpc
import grpc.aio

from kustody.api.errors import HsmError
from kustody.api.rpcerror import CODES, REASON_KEY
from kustody.client.errors import Reason

_CODES: dict[str, grpc.StatusCode] = {
    Reason.TOKEN_MISSING: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_MALFORMED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_INVALID: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_EXPIRED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.TOKEN_WRONG_AUDIENCE: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NOT_A_SERVICE_ACCOUNT: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NAMESPACE_MISMATCH: grpc.StatusCode.PERMISSION_DENIED,
    Reason.NOT_A_CONSUMER: grpc.StatusCode.PERMISSION_DENIED,
    Reason.KEYRING_MISMATCH: grpc.StatusCode.PERMISSION_DENIED,
    Reason.NAMESPACE_NOT_ALLOWED: grpc.StatusCode.PERMISSION_DENIED,
    Reason.KEYRING_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.DATAKEY_NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.PEER_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.AUTH_RATE_LIMITED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.AUTH_BUSY: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.AUTH_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    **{str(reason): code for reason, code in CODES.items()},
}


class Refusal(Exception):
    """Why an unwrap was not served. ``message`` is safe to return to the caller and to log:
    it never holds a token or key material."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    @classmethod
    def from_hsm(cls, error: HsmError) -> Refusal:
        return cls(str(error.reason), error.message)

    @property
    def code(self) -> grpc.StatusCode:
        return _CODES.get(self.reason, grpc.StatusCode.INTERNAL)

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


async def abort(context: grpc.aio.ServicerContext[Any, Any], refusal: Refusal) -> NoReturn:
    await context.abort(
        refusal.code, refusal.message, trailing_metadata=((REASON_KEY, refusal.reason),)
    )
