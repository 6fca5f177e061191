"""The sidecar's hold on its token: connect, notice loss, reconnect, say why not.

All state changes happen on the PKCS#11 thread. Readers on the event loop see ``health`` and
``snapshot``, immutable values replaced atomically.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from kustody.domain.keyversion import VersionInfo
from kustody.hsm import thread
from kustody.hsm.errors import HsmError, Reason
from kustody.hsm.kekstore import KekStore
from kustody.hsm.pin import read_pin
from kustody.hsm.token import TokenConfig, TokenLost, TokenSession

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Health:
    serving: bool
    reason: Reason | None
    message: str


_NOT_YET = Health(False, Reason.TOKEN_UNAVAILABLE, "not connected to the token yet")


class HsmConnection:
    """One token, one logged-in session, reopened when it is lost."""

    def __init__(self, config: TokenConfig, *, retry_interval: float = 1.0) -> None:
        self.config = config
        self.retry_interval = retry_interval
        self.health = _NOT_YET
        self._token: TokenSession | None = None
        self._store: KekStore | None = None
        self._last_attempt = float("-inf")
        self._rejected_pin: bytes | None = None
        self._lost = False

    @property
    def snapshot(self) -> tuple[VersionInfo, ...]:
        store = self._store
        return store.snapshot if store is not None else ()

    async def start(self) -> Health:
        return await thread.run(lambda: self._check(force=True))

    async def check(self) -> Health:
        """Probe the token (reconnecting if it was lost) and return the current health."""
        return await thread.run(lambda: self._check(force=False))

    async def run(self, fn: Callable[[KekStore], T]) -> T:
        """Run ``fn`` with the KEK store on the PKCS#11 thread."""
        return await thread.run(lambda: self.run_here(fn))

    def run_here(self, fn: Callable[[KekStore], T]) -> T:
        """Like :meth:`run`, for code already on the PKCS#11 thread (or blocking callers)."""
        if not thread.on_thread():
            return thread.call(lambda: self.run_here(fn))
        store = self._ensure(force=False)
        try:
            return fn(store)
        except TokenLost as exc:
            self._lose(str(exc))
            raise HsmError(
                Reason.TOKEN_UNAVAILABLE, "the token stopped answering; reconnecting"
            ) from None

    async def close(self) -> None:
        await thread.run(self._close)

    # -- on the PKCS#11 thread ---------------------------------------------------------------

    def _check(self, *, force: bool) -> Health:
        if self._token is not None:
            try:
                self._token.probe()
            except TokenLost as exc:
                self._lose(str(exc))
        if self._store is None:
            with contextlib.suppress(HsmError):
                self._ensure(force=force)
        return self.health

    def _ensure(self, *, force: bool) -> KekStore:
        if self._store is not None:
            return self._store
        now = time.monotonic()
        if force or now - self._last_attempt >= self.retry_interval:
            self._last_attempt = now
            self._connect()
        if self._store is None:
            raise HsmError(Reason.TOKEN_UNAVAILABLE, f"{self.health.reason}: {self.health.message}")
        return self._store

    def _connect(self) -> None:
        try:
            if self.config.pin_file is None:
                raise HsmError(
                    Reason.PIN_FILE_UNREADABLE,
                    "no PIN file: pass --pin-file or set KUSTODY_HSM_PIN_FILE",
                )
            pin = read_pin(self.config.pin_file)
            if pin.digest == self._rejected_pin:
                # Retrying a rejected PIN could lock a real HSM; wait for the file to change.
                return
            token = TokenSession.open(self.config, pin, reinitialize=self._lost)
            try:
                store = KekStore(token)
            except (TokenLost, HsmError):
                token.close()
                raise
        except HsmError as exc:
            if exc.reason is Reason.PIN_INCORRECT and self.config.pin_file is not None:
                self._rejected_pin = read_pin(self.config.pin_file).digest
            self._set(Health(False, exc.reason, exc.message))
            return
        except TokenLost as exc:
            self._lost = True
            self._set(Health(False, Reason.TOKEN_LOST, f"the token stopped answering ({exc})"))
            return
        self._token, self._store, self._rejected_pin = token, store, None
        self._set(Health(True, None, f"token {self.config.label!r} is logged in"))

    def _lose(self, why: str) -> None:
        self._close()
        self._lost = True
        self._last_attempt = float("-inf")
        self._set(Health(False, Reason.TOKEN_LOST, f"the token stopped answering ({why})"))

    def _close(self) -> None:
        if self._token is not None:
            self._token.close()
        self._token = self._store = None

    def _set(self, health: Health) -> None:
        if health != self.health:
            if health.serving:
                log.info("HSM token %r is available", self.config.label)
            else:
                log.warning("HSM token %r is unavailable: %s", self.config.label, health.message)
        self.health = health
