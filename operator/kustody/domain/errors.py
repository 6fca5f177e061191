"""Errors raised by pure domain code; the HSM layer maps each to a stable reason."""

from __future__ import annotations


class DomainError(ValueError):
    """Input that domain rules reject. Messages never contain key material."""


class MalformedEnvelope(DomainError):
    """A wrapped key that does not parse as a Kustody envelope."""


class InvalidArgument(DomainError):
    """A KeyRing name, version, binding or size that the rules do not allow."""


class InvalidSpec(DomainError):
    """A custom resource's spec the operator cannot use; the message is a sentence that names
    the field (it becomes the ``InvalidSpec`` condition's message)."""
