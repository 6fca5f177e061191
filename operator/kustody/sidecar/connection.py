"""The sidecar's hold on its token, through the PKCS#11 worker process.

All PKCS#11 work runs in one worker process (:mod:`kustody.pkcs11.worker`, started here with
``python -m kustody.pkcs11.worker``), never in this one: the front end keeps the event loop and
gRPC, the worker keeps the token session, and each has its own GIL and core. They talk over a
socketpair with length-prefixed frames (:mod:`kustody.api.wire`); every request carries an id,
so many may be in flight and the worker takes the next one from the socket buffer as soon as it
finishes the last.

``health`` and ``snapshot`` are immutable values replaced atomically, mirrored from the worker
(each answer carries them when they changed), so readers (metrics scrapes) never call the HSM.

When the worker dies (crash, SIGKILL, a hung call killed by the watchdog) every request in
flight fails at once with ``TOKEN_UNAVAILABLE``, Health says ``WORKER_LOST`` and why, and a new
worker is started with exponential backoff. The worker dies with this process
(``PR_SET_PDEATHSIG`` and EOF on the socket).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Protocol

from kustody.api import wire
from kustody.api.errors import HsmError, Reason
from kustody.api.health import NOT_YET, Health, reason_of
from kustody.api.token import TokenConfig
from kustody.domain.keyversion import (
    DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    KeyVersionRef,
    VersionInfo,
    VersionState,
)
from kustody.sidecar.frames import FramedStream

log = logging.getLogger(__name__)

_MAX_BACKOFF = 10.0
_FIRST_BACKOFF = 0.1
_STABLE_AFTER = 10.0  # a worker that lived this long resets the backoff


class Waiter(Protocol):
    """Who waits for one answer of the worker: an asyncio.Future, or anything that behaves
    like one for these four calls (e.g. a batch that hands each item to its own future)."""

    def done(self) -> bool: ...

    def cancel(self) -> bool: ...

    def set_result(self, result: Any, /) -> None: ...

    def set_exception(self, exception: BaseException, /) -> None: ...


class TokenLink(Protocol):
    """What :class:`kustody.sidecar.keyservice.KeyService` needs of its way to the token: the
    worker process itself (:class:`HsmConnection`, in the first front end) or a relay to the
    front end that owns it (:class:`kustody.sidecar.relay.RelayLink`, in the others)."""

    health: Health
    snapshot: tuple[VersionInfo, ...]

    @property
    def token_label(self) -> str: ...

    def submit(self, op: wire.Op, args: Any, waiter: Waiter) -> None: ...

    async def request(self, op: wire.Op, args: Any) -> Any: ...

    async def check(self, *, force: bool = False) -> Health: ...


def info_from_wire(item: wire.WireInfo) -> VersionInfo:
    ring, version, state, fingerprint, escrowable = item
    return VersionInfo(KeyVersionRef(ring, version), VersionState(state), fingerprint, escrowable)


def exit_text(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


class _Worker:
    """One worker process and the front end's end of its socket, served by one event loop."""

    def __init__(
        self,
        owner: HsmConnection,
        process: subprocess.Popen[bytes],
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.owner = owner
        self.process = process
        self.started = time.monotonic()
        self.pending: Pending = {}
        self.dead = False
        self.stream = FramedStream(
            sock,
            loop,
            on_frame=lambda request_id, status, body: owner._deliver(
                self, request_id, status, body
            ),
            on_too_large=lambda request_id, error: owner._refuse(self, request_id, error),
            on_closed=lambda: owner._dead(self),
            incoming="an answer",
        )

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.stream.loop

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve this worker from another event loop (tests run one loop per call)."""
        for waiter, timer in self.pending.values():  # their loop is gone or no longer ours
            timer.cancel()
            with contextlib.suppress(RuntimeError):
                waiter.cancel()
        self.pending.clear()
        self.stream.rebind(loop)

    def send(self, data: bytes) -> None:
        self.stream.send(data)

    def detach(self) -> None:
        self.dead = True
        self.stream.close()

    def fail_pending(self, error: HsmError) -> None:
        fail_all(self.pending, error)

    def reap(self, timeout: float) -> int | None:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()


Pending = dict[int, tuple[Waiter, asyncio.TimerHandle]]
"""Request id -> who waits for the answer, and its watchdog timer."""


def answer(pending: Pending, request_id: int, status: int, result: Any) -> None:
    """Hand an answer to its waiter, if it still waits: the result, or the HsmError the
    answer names."""
    if status == wire.STATUS_OK:
        entry = pending.pop(request_id, None)
        if entry is not None:
            entry[1].cancel()
            if not entry[0].done():
                entry[0].set_result(result)
        return
    fail(pending, request_id, HsmError(reason_of(result[0]) or Reason.INTERNAL, result[1]))


def fail(pending: Pending, request_id: int, error: HsmError) -> None:
    """Fail one waiter with ``error``, if it still waits."""
    entry = pending.pop(request_id, None)
    if entry is not None:
        entry[1].cancel()
        if not entry[0].done():
            entry[0].set_exception(error)


def fail_all(pending: Pending, error: HsmError) -> None:
    """Fail every waiter in ``pending`` (emptied) with its own copy of ``error``."""
    waiting = list(pending.values())
    pending.clear()
    for waiter, timer in waiting:
        timer.cancel()
        if not waiter.done():
            with contextlib.suppress(RuntimeError):
                waiter.set_exception(HsmError(error.reason, error.message))


class HsmConnection:
    """One token, one logged-in session in the worker process, reopened when it is lost."""

    def __init__(
        self,
        config: TokenConfig,
        *,
        retry_interval: float = 1.0,
        op_timeout: float = 30.0,
        min_destroy_delay: float = DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    ) -> None:
        self.config = config
        self.retry_interval = retry_interval
        self.op_timeout = op_timeout
        self.min_destroy_delay = min_destroy_delay
        self.health = NOT_YET
        self.snapshot: tuple[VersionInfo, ...] = ()
        self._worker: _Worker | None = None
        self._ids = itertools.count(1)
        self._failures = 0
        self._next_spawn = 0.0
        self._closed = False
        self._restarts: set[asyncio.Task[Health]] = set()

    @property
    def token_label(self) -> str:
        return self.config.label

    @property
    def worker_pid(self) -> int | None:
        worker = self._worker
        return worker.process.pid if worker is not None else None

    async def start(self) -> Health:
        self._closed = False
        return await self.check(force=True)

    async def check(self, *, force: bool = False) -> Health:
        """Probe the token (reconnecting if it was lost) and return the current health."""
        with contextlib.suppress(HsmError):
            await self.request(wire.Op.CHECK, (force,))
        return self.health

    async def request(self, op: wire.Op, args: Any) -> Any:
        """Run the named operation in the worker; its result, or the HsmError it raised."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self.submit(op, args, future)
        return await future

    def submit(self, op: wire.Op, args: Any, waiter: Waiter) -> None:
        """Send the named operation to the worker now, without waiting: ``waiter`` gets its
        result or the HsmError it raised (``set_result``/``set_exception``, unless it is
        ``done()`` by then, e.g. cancelled). Raises HsmError when there is no worker.

        Several requests may be submitted before awaiting any (a batch sent in chunks, so the
        worker seals chunk 1 while this process decodes chunk 2); each is answered on its own.
        """
        loop = asyncio.get_running_loop()
        worker = self._worker_for(loop)
        request_id = next(self._ids) & 0xFFFFFFFF
        data = wire.frame(request_id, op, args)  # REQUEST_TOO_LARGE before anything is sent
        timer = loop.call_later(self.op_timeout, self._overdue, worker, request_id)
        worker.pending[request_id] = (waiter, timer)
        worker.send(data)

    async def rescan(self) -> None:
        """Drop cached key handles and rescan the token, as a restart would."""
        await self.request(wire.Op.RESCAN, ())

    async def close(self) -> None:
        self._closed = True
        worker, self._worker = self._worker, None
        if worker is None:
            return
        worker.detach()  # EOF: the worker closes its session and exits
        worker.fail_pending(HsmError(Reason.TOKEN_UNAVAILABLE, "the HSM sidecar is stopping"))
        await asyncio.to_thread(worker.reap, 10.0)

    # -- the worker ------------------------------------------------------------------------------

    def _worker_for(self, loop: asyncio.AbstractEventLoop) -> _Worker:
        worker = self._worker
        if worker is not None:
            if worker.loop is not loop:
                worker.rebind(loop)
            return worker
        if self._closed:
            raise HsmError(Reason.TOKEN_UNAVAILABLE, "the HSM sidecar is stopping")
        wait = self._next_spawn - time.monotonic()
        if wait > 0:
            raise HsmError(
                Reason.TOKEN_UNAVAILABLE,
                f"{self.health.message}; next attempt in {wait:.1f}s",
            )
        return self._spawn(loop)

    def _spawn(self, loop: asyncio.AbstractEventLoop) -> _Worker:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        config = self.config
        command = [
            sys.executable, "-m", "kustody.pkcs11.worker",
            "--fd", str(theirs.fileno()), "--parent", str(os.getpid()),
            "--module", str(config.module), "--label", config.label,
            "--retry-interval", str(self.retry_interval),
            "--min-destroy-delay", str(self.min_destroy_delay), "--gcm-iv", config.gcm_iv,
            "--log-level", logging.getLevelName(logging.getLogger().getEffectiveLevel()),
        ]  # fmt: skip
        if config.pin_file is not None:
            command += ["--pin-file", str(config.pin_file)]  # the path; the worker reads it
        try:
            process = subprocess.Popen(
                command, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL
            )
        except OSError as exc:
            ours.close()
            self._schedule_restart(loop, f"the PKCS#11 worker could not start ({exc.strerror})")
            raise HsmError(Reason.TOKEN_UNAVAILABLE, self.health.message) from None
        finally:
            theirs.close()
        worker = _Worker(self, process, ours, loop)
        self._worker = worker
        log.debug("started PKCS#11 worker process %d", process.pid)
        return worker

    def _deliver(self, worker: _Worker, request_id: int, status: int, message: Any) -> None:
        result, health, snapshot = message
        if health is not None:
            self.health = Health.from_wire(health)
        if snapshot is not None:
            self.snapshot = tuple(info_from_wire(i) for i in snapshot)
        answer(worker.pending, request_id, status, result)

    def _refuse(self, worker: _Worker, request_id: int, error: HsmError) -> None:
        log.error("%s", error.message)
        fail(worker.pending, request_id, error)

    def _overdue(self, worker: _Worker, request_id: int) -> None:
        if worker.dead or request_id not in worker.pending:
            return
        log.error(
            "the PKCS#11 worker process %d did not answer within %.0fs; killing it",
            worker.process.pid,
            self.op_timeout,
        )
        with contextlib.suppress(ProcessLookupError):
            worker.process.kill()

    def _dead(self, worker: _Worker) -> None:
        if worker.dead:
            return
        worker.detach()
        if self._worker is worker:
            self._worker = None
        code = worker.reap(2.0)
        why = f"the PKCS#11 worker process {worker.process.pid} died ({exit_text(code)})"
        if time.monotonic() - worker.started >= _STABLE_AFTER:
            self._failures = 0
        if not self._closed:
            self._schedule_restart(worker.loop, why)
        worker.fail_pending(HsmError(Reason.TOKEN_UNAVAILABLE, f"{why}; restarting it"))

    def _schedule_restart(self, loop: asyncio.AbstractEventLoop, why: str) -> None:
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2**self._failures)
        self._failures += 1
        self._next_spawn = time.monotonic() + delay
        log.error("%s; restarting it in %.1fs", why, delay)
        self.health = Health(False, Reason.WORKER_LOST, f"{why}; restarting it")
        self.snapshot = ()
        if not loop.is_closed():
            loop.call_later(delay, self._restart, loop)

    def _restart(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._worker is None and not self._closed and loop.is_running():
            self._next_spawn = 0.0
            task = loop.create_task(self.check(force=True))
            self._restarts.add(task)
            task.add_done_callback(self._restarts.discard)
