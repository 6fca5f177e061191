"""API-server failures as typed errors (no response bodies with object contents in messages)."""

from __future__ import annotations


class KubeError(Exception):
    """A failed API request: ``status`` is the HTTP status, ``reason`` the API's reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message


class NotFound(KubeError):
    pass


class Conflict(KubeError):
    """409: AlreadyExists on create, or a stale resourceVersion on update."""


class Unavailable(KubeError):
    """The API server could not be reached or answered 5xx/429."""
