"""Why an unwrap failed: a stable reason (the API's ``kustody-reason``) and a safe message.

Messages name DataKeys, namespaces and reasons; never a token or key material.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    """Reasons the workload API and this client use (the sidecar may add HSM reasons such as
    ``VERSION_DISABLED`` or ``AAD_MISMATCH``; they arrive as plain strings)."""

    # Authentication (gRPC UNAUTHENTICATED)
    TOKEN_MISSING = "TOKEN_MISSING"  # noqa: S105 (a reason, not a secret)
    TOKEN_MALFORMED = "TOKEN_MALFORMED"  # noqa: S105
    TOKEN_INVALID = "TOKEN_INVALID"  # noqa: S105
    TOKEN_EXPIRED = "TOKEN_EXPIRED"  # noqa: S105
    TOKEN_WRONG_AUDIENCE = "TOKEN_WRONG_AUDIENCE"  # noqa: S105
    NOT_A_SERVICE_ACCOUNT = "NOT_A_SERVICE_ACCOUNT"
    # Authorisation (gRPC PERMISSION_DENIED / NOT_FOUND)
    NAMESPACE_MISMATCH = "NAMESPACE_MISMATCH"
    DATAKEY_NOT_FOUND = "DATAKEY_NOT_FOUND"
    NOT_A_CONSUMER = "NOT_A_CONSUMER"
    KEYRING_MISMATCH = "KEYRING_MISMATCH"
    NAMESPACE_NOT_ALLOWED = "NAMESPACE_NOT_ALLOWED"  # the KeyRing no longer allows it
    KEYRING_NOT_FOUND = "KEYRING_NOT_FOUND"
    # The request itself (gRPC INVALID_ARGUMENT; the HSM adds MALFORMED_ENVELOPE, AAD_MISMATCH)
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    # Transient (gRPC RESOURCE_EXHAUSTED / UNAVAILABLE): the client retries these
    RATE_LIMITED = "RATE_LIMITED"  # this ServiceAccount's unwraps/s
    PEER_RATE_LIMITED = "PEER_RATE_LIMITED"  # new (uncached) tokens/s from one address
    AUTH_RATE_LIMITED = "AUTH_RATE_LIMITED"  # new (uncached) tokens/s in total
    AUTH_BUSY = "AUTH_BUSY"  # TokenReviews in flight at the bound
    AUTH_UNAVAILABLE = "AUTH_UNAVAILABLE"
    # Client side, before or instead of a call
    SECRET_UNREADABLE = "SECRET_UNREADABLE"  # noqa: S105
    TOKEN_FILE_UNREADABLE = "TOKEN_FILE_UNREADABLE"  # noqa: S105
    CA_UNREADABLE = "CA_UNREADABLE"
    NO_ENDPOINT = "NO_ENDPOINT"
    UNREACHABLE = "UNREACHABLE"
    UNKNOWN = "UNKNOWN"
    # Audit only: the caller went away before an answer (no answer was sent)
    CANCELLED = "CANCELLED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"


# RESOURCE_EXHAUSTED with one of these: the client backs off and tries again.
BACKOFF_REASONS = frozenset(
    {
        Reason.RATE_LIMITED,
        Reason.PEER_RATE_LIMITED,
        Reason.AUTH_RATE_LIMITED,
        Reason.AUTH_BUSY,
    }
)


class UnwrapError(Exception):
    """A failed unwrap. ``reason`` is a :class:`Reason` value or an HSM reason string;
    ``retryable`` says whether trying again later can help (the client already did)."""

    def __init__(self, reason: str, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.retryable = retryable

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"
