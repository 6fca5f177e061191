"""What can go wrong when a workload encrypts or decrypts with its keyset.

Every error carries a stable ``reason`` (the same shape as :class:`~kustody.client.UnwrapError`,
so logs read alike) and a message that names key ids, generations and the DataKey, never key
material or plaintext. They are not :class:`~kustody.client.UnwrapError` subclasses on purpose:
code that catches a failed *unwrap* (and may retry it) must not swallow a ciphertext that failed
authentication.
"""

from __future__ import annotations

from typing import ClassVar


class KeysetError(Exception):
    """Base of the keyset library's errors. ``reason`` is stable; ``message`` is for people."""

    reason: ClassVar[str] = "KEYSET_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class KeysetUnreadable(KeysetError):
    """The keyset file could not be read (missing, permissions, too large)."""

    reason = "KEYSET_UNREADABLE"


class InvalidKeyset(KeysetError):
    """The keyset file is not a valid ``kustody.io/keyset/v1`` document."""

    reason = "KEYSET_INVALID"


class UnknownKeyId(KeysetError):
    """The ciphertext names a key id this keyset does not hold: its generation was removed
    from the DataKey, or the ciphertext was made with another DataKey's keyset."""

    reason = "KEY_ID_UNKNOWN"

    def __init__(self, message: str, key_id: int) -> None:
        super().__init__(message)
        self.key_id = key_id


class MalformedCiphertext(KeysetError):
    """Not a Kustody ciphertext of the expected kind: too short, an unknown format byte, a
    streaming ciphertext given to the one-shot API (or the reverse), an impossible header."""

    reason = "CIPHERTEXT_MALFORMED"


class DecryptionFailed(KeysetError):
    """Authentication failed: the ciphertext was changed, truncated, reordered or extended, or
    the associated data differs from the one it was encrypted with. No plaintext is released
    for the failing segment; for a stream, discard everything already written."""

    reason = "DECRYPTION_FAILED"


class MessageTooLarge(KeysetError):
    """A one-shot message (or its associated data) exceeds what AES-GCM takes in one call;
    use the streaming API."""

    reason = "MESSAGE_TOO_LARGE"
