"""A logged-in session on one PKCS#11 token, and what its failures mean.

Thread-confined: every method runs on the PKCS#11 thread (:mod:`kustody.pkcs11.thread`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pkcs11
import pkcs11.exceptions as p11

from kustody.api.errors import HsmError, Reason
from kustody.api.pin import Pin
from kustody.api.token import TokenConfig
from kustody.pkcs11 import thread

log = logging.getLogger(__name__)

# One pkcs11.lib per module path per process: the library is initialised once (C_Initialize)
# and re-initialised (C_Finalize + C_Initialize) to rescan slots after the token is lost.
_libs: dict[str, Any] = {}

_LOST = (
    p11.ObjectHandleInvalid,
    p11.KeyHandleInvalid,
    p11.SessionHandleInvalid,
    p11.SessionClosed,
    p11.TokenNotPresent,
    p11.TokenNotRecognised,
    p11.DeviceRemoved,
    p11.DeviceError,
    p11.UserNotLoggedIn,
)
_FULL = (p11.DeviceMemory, p11.HostMemory)


class TokenLost(Exception):
    """The token stopped answering; the session must be re-opened."""


def classify(exc: BaseException) -> Reason:
    """The reason a PKCS#11 exception stands for (by type only; its text is not trusted)."""
    if isinstance(exc, _LOST):
        return Reason.TOKEN_LOST
    if isinstance(exc, _FULL):
        return Reason.TOKEN_FULL
    if isinstance(exc, p11.PinIncorrect | p11.PinInvalid | p11.PinLenRange | p11.PinLocked):
        return Reason.PIN_INCORRECT
    return Reason.INTERNAL


def _load(module: Path, reinitialize: bool) -> Any:
    key = str(module)
    lib = _libs.get(key)
    if lib is None:
        if not module.is_file():
            raise HsmError(Reason.MODULE_UNAVAILABLE, f"PKCS#11 module {module} does not exist")
        try:
            lib = pkcs11.lib(key)
        except p11.PKCS11Error as exc:
            raise HsmError(
                Reason.MODULE_UNAVAILABLE,
                f"PKCS#11 module {module} could not be loaded ({type(exc).__name__})",
            ) from None
        _libs[key] = lib
    elif reinitialize:
        try:
            lib.reinitialize()
        except p11.PKCS11Error:
            lib.initialize()
    return lib


class TokenSession:
    """One read-write session, logged in as the user."""

    def __init__(
        self, config: TokenConfig, session: Any, slot: Any, lib: Any = None, token: Any = None
    ) -> None:
        self.config = config
        self.session = session
        self._slot = slot
        self.lib = lib  # for the capability probe (library and token info)
        self.token = token

    @classmethod
    def open(cls, config: TokenConfig, pin: Pin, *, reinitialize: bool) -> TokenSession:
        thread.assert_on_thread()
        lib = _load(config.module, reinitialize)
        try:
            token = lib.get_token(token_label=config.label)
        except p11.NoSuchToken:
            raise HsmError(
                Reason.TOKEN_NOT_FOUND, f"no token labelled {config.label!r} in {config.module}"
            ) from None
        except p11.MultipleTokensReturned:
            raise HsmError(
                Reason.TOKEN_NOT_FOUND, f"more than one token is labelled {config.label!r}"
            ) from None
        except p11.PKCS11Error as exc:
            raise HsmError(
                Reason.TOKEN_NOT_FOUND,
                f"listing tokens in {config.module} failed ({type(exc).__name__})",
            ) from None
        try:
            session = token.open(user_pin=pin.reveal(), rw=True)
        except p11.UserAlreadyLoggedIn:
            # Login is per application: an earlier session of this process is still open.
            session = token.open(rw=True)
        except p11.PKCS11Error as exc:
            reason = classify(exc)
            if reason is Reason.PIN_INCORRECT:
                raise HsmError(
                    reason, f"login to token {config.label!r} failed: the PIN is not accepted"
                ) from None
            raise HsmError(
                Reason.TOKEN_UNAVAILABLE,
                f"opening a session on {config.label!r} failed ({type(exc).__name__})",
            ) from None
        return cls(config, session, token.slot, lib, token)

    def probe(self) -> None:
        """Raise :class:`TokenLost` unless the token still answers for this session."""
        thread.assert_on_thread()
        try:
            info = self._slot.get_token()
            if info.label != self.config.label:
                raise TokenLost("a different token is in the slot")
            self.session.generate_random(8)
        except p11.PKCS11Error as exc:
            raise TokenLost(type(exc).__name__) from None

    def close(self) -> None:
        thread.assert_on_thread()
        try:
            self.session.close()
        except p11.PKCS11Error as exc:
            log.debug("closing the session failed: %s", type(exc).__name__)
