"""Whether the token serves: one type for the PKCS#11 worker, the sidecar's front end and
the operator's client (and the frame and protobuf forms it travels in)."""

from __future__ import annotations

from dataclasses import dataclass

from kustody.api.errors import Reason


def reason_of(text: str) -> Reason | None:
    """The Reason a string names ("" is none; one this version does not know is INTERNAL)."""
    if not text:
        return None
    try:
        return Reason(text)
    except ValueError:
        return Reason.INTERNAL


@dataclass(frozen=True)
class Health:
    serving: bool
    reason: Reason | None  # why it does not serve (None while it serves)
    message: str

    def to_wire(self) -> tuple[bool, str, str]:
        return (self.serving, str(self.reason or ""), self.message)

    @classmethod
    def from_wire(cls, item: tuple[bool, str, str]) -> Health:
        serving, reason, message = item
        return cls(bool(serving), reason_of(reason), message)


NOT_YET = Health(False, Reason.TOKEN_UNAVAILABLE, "not connected to the token yet")
