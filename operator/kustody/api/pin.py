"""The token PIN: read from a file (a mounted Secret), never from an argument, never shown."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from kustody.api.errors import HsmError, Reason

PIN_FILE_ENV = "KUSTODY_HSM_PIN_FILE"


class Pin:
    """A PIN whose repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    @property
    def digest(self) -> bytes:
        """A hash to notice a changed PIN file without keeping two PINs around."""
        return hashlib.sha256(self._value.encode()).digest()

    def __repr__(self) -> str:
        return "Pin(<redacted>)"

    __str__ = __repr__


def pin_file_from(arg: str | None) -> Path | None:
    """``--pin-file`` if given, else the file named by $KUSTODY_HSM_PIN_FILE."""
    value = arg or os.environ.get(PIN_FILE_ENV)
    return Path(value) if value else None


def read_pin(path: Path) -> Pin:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise HsmError(
            Reason.PIN_FILE_UNREADABLE, f"cannot read the PIN file {path}: {exc.strerror}"
        ) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HsmError(Reason.PIN_FILE_UNREADABLE, f"the PIN file {path} is not UTF-8") from None
    text = text.removesuffix("\n").removesuffix("\r")
    if not text:
        raise HsmError(Reason.PIN_FILE_UNREADABLE, f"the PIN file {path} is empty")
    return Pin(text)
