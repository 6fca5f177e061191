"""Typed sidecar errors: a stable reason plus a message safe to show anywhere.

Messages never contain key material, plaintext or the PIN. The reason is part of the API:
clients match on it (it travels as the ``kustody-reason`` trailing metadata of a gRPC status).
"""

from __future__ import annotations

import enum

from kustody.domain.errors import DomainError, InvalidArgument, MalformedEnvelope


class Reason(enum.StrEnum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    MALFORMED_ENVELOPE = "MALFORMED_ENVELOPE"
    AAD_MISMATCH = "AAD_MISMATCH"
    VERSION_NOT_FOUND = "VERSION_NOT_FOUND"
    VERSION_DISABLED = "VERSION_DISABLED"
    VERSION_DESTROYED = "VERSION_DESTROYED"
    VERSION_NOT_DISABLED = "VERSION_NOT_DISABLED"
    NO_PRIMARY_VERSION = "NO_PRIMARY_VERSION"
    # DestroyVersion on a version not DESTROY_SCHEDULED for the minimum waiting period.
    DESTRUCTION_NOT_DUE = "DESTRUCTION_NOT_DUE"
    # The token object with a KEK version's label and ID is not a key Kustody generated
    # (extractable, not generated in the token, not AES-256, can wrap/unwrap, ...): unused.
    KEY_NOT_TRUSTED = "KEY_NOT_TRUSTED"
    # A remote (mTLS) client whose certificate identity is unknown or whose role does not
    # allow the RPC.
    PERMISSION_DENIED = "PERMISSION_DENIED"
    PLAINTEXT_EXPORT_FORBIDDEN = "PLAINTEXT_EXPORT_FORBIDDEN"
    REQUEST_TOO_LARGE = "REQUEST_TOO_LARGE"
    TOKEN_UNAVAILABLE = "TOKEN_UNAVAILABLE"  # noqa: S105 (a reason, not a secret)
    TOKEN_FULL = "TOKEN_FULL"  # noqa: S105 (a reason, not a secret)
    # Why the token is unavailable (Health), more specific than TOKEN_UNAVAILABLE.
    MODULE_UNAVAILABLE = "MODULE_UNAVAILABLE"
    TOKEN_NOT_FOUND = "TOKEN_NOT_FOUND"  # noqa: S105 (a reason, not a secret)
    PIN_INCORRECT = "PIN_INCORRECT"
    PIN_FILE_UNREADABLE = "PIN_FILE_UNREADABLE"
    TOKEN_LOST = "TOKEN_LOST"  # noqa: S105 (a reason, not a secret)
    WORKER_LOST = "WORKER_LOST"  # the PKCS#11 worker process died; it is being restarted
    # The token answers but lacks what Kustody needs (the capability probe says what), or the
    # --gcm-iv policy asks for what it cannot do; see `kustody hsm probe`.
    TOKEN_INCOMPATIBLE = "TOKEN_INCOMPATIBLE"  # noqa: S105 (a reason, not a secret)
    # Escrow: the agent's key is not in the token as a trusted wrapping key (the token
    # itself refuses to wrap under it), or the version was not created for escrow.
    ESCROW_AGENT_NOT_ADMITTED = "ESCROW_AGENT_NOT_ADMITTED"
    VERSION_NOT_ESCROWABLE = "VERSION_NOT_ESCROWABLE"
    INTERNAL = "INTERNAL"


class HsmError(Exception):
    """A failed sidecar operation with a stable :class:`Reason`."""

    def __init__(self, reason: Reason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


def from_domain(exc: DomainError) -> HsmError:
    if isinstance(exc, MalformedEnvelope):
        return HsmError(Reason.MALFORMED_ENVELOPE, str(exc))
    if isinstance(exc, InvalidArgument):
        return HsmError(Reason.INVALID_ARGUMENT, str(exc))
    return HsmError(Reason.INVALID_ARGUMENT, str(exc))
