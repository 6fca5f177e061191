"""What PKCS#11 failures mean to the sidecar (by exception type), and the PIN file."""

from __future__ import annotations

from pathlib import Path

import pkcs11.exceptions as p11
import pytest
from kustody.api.errors import HsmError, Reason
from kustody.api.pin import Pin, read_pin
from kustody.pkcs11.token import classify


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (p11.DeviceMemory(), Reason.TOKEN_FULL),
        (p11.HostMemory(), Reason.TOKEN_FULL),
        (p11.TokenNotPresent(), Reason.TOKEN_LOST),
        (p11.ObjectHandleInvalid(), Reason.TOKEN_LOST),
        (p11.SessionHandleInvalid(), Reason.TOKEN_LOST),
        (p11.PinIncorrect(), Reason.PIN_INCORRECT),
        (p11.MechanismInvalid(), Reason.INTERNAL),
    ],
)
def test_classify(exc: Exception, reason: Reason) -> None:
    assert classify(exc) is reason


def test_pin_file_is_read_without_trailing_newline(tmp_path: Path) -> None:
    path = tmp_path / "pin"
    path.write_text("1234\n")
    pin = read_pin(path)
    assert pin.reveal() == "1234"
    assert "1234" not in repr(pin)
    assert "1234" not in str(pin)
    assert isinstance(pin, Pin)


@pytest.mark.parametrize("content", [None, b"", b"\xff\xfe"])
def test_unreadable_pin_file_is_typed(tmp_path: Path, content: bytes | None) -> None:
    path = tmp_path / "pin"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(HsmError) as info:
        read_pin(path)
    assert info.value.reason is Reason.PIN_FILE_UNREADABLE
