"""The way from an extra workload front end to the token: a relay through the first front end.

``kustody hsm --workload-front-ends N`` serves the workload unwrap service from N processes
(:mod:`kustody.sidecar.unwrap.frontends`). Only the first owns the PKCS#11 worker process (a
token has one owner); each other front end holds one end of a socketpair whose other end the
first serves here, with the same frames as the worker's (:mod:`kustody.api.wire`).

What crosses a relay, and nothing else:

* ``DECRYPT`` batches (all an unwrap needs), passed to the worker as they are: an extra front
  end can decrypt, as the first one's unwrap service can, and do nothing else with the token
  (no key creation, state changes, destruction, escrow export, seals): anything else is
  refused with ``PERMISSION_DENIED``;
* ``CHECK``, answered from the first front end's mirror of the worker's health (the token is
  not probed for it);
* :data:`READY`, a notice from the extra front end (never answered): its server listens;
* :data:`METRICS`, the other way: the first front end asks, at each scrape of its /metrics,
  for the extra front end's unwrap metrics (summed into its own), and gets them back under
  the same request id and code.

Answers carry the health when it changed, as the worker's do, so an extra front end mirrors
it. A front end whose relay closes (the first front end stopped or died) fails what it had in
flight with ``TOKEN_UNAVAILABLE`` and stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
from collections.abc import Callable
from typing import Any

from kustody.api import wire
from kustody.api.errors import HsmError, Reason
from kustody.api.health import NOT_YET, Health
from kustody.domain.keyversion import VersionInfo
from kustody.sidecar.connection import HsmConnection, Pending, Waiter, answer, fail, fail_all
from kustody.sidecar.frames import FramedStream

READY = 100  # notice, extra -> first: () -- the extra front end's server is listening
METRICS = 101  # first -> extra: (); answer: unwrap.metrics.Snapshot (same request id and code)
NOTICE_ID = 0  # the request id of notices (requests count from 1)

# Slack over the first front end's own watchdog before an extra one gives up on an answer.
_SLACK_SECONDS = 5.0


class _Answer:
    """Waits for the worker's answer to one relayed request and sends it back."""

    __slots__ = ("_done", "_port", "_request_id")

    def __init__(self, port: RelayPort, request_id: int) -> None:
        self._port = port
        self._request_id = request_id
        self._done = False

    def done(self) -> bool:
        return self._done

    def cancel(self) -> bool:
        self.set_exception(HsmError(Reason.TOKEN_UNAVAILABLE, "the request was cancelled"))
        return True

    def set_result(self, result: Any, /) -> None:
        if not self._done:
            self._done = True
            self._port.answer(self._request_id, wire.STATUS_OK, result)

    def set_exception(self, exception: BaseException, /) -> None:
        if self._done:
            return
        self._done = True
        if isinstance(exception, HsmError):
            error = (str(exception.reason), exception.message)
        else:  # never the text: it could hold data
            error = (str(Reason.INTERNAL), f"internal error ({type(exception).__name__})")
        self._port.answer(self._request_id, wire.STATUS_ERROR, error)


class RelayPort:
    """The first front end's end of one extra front end's relay."""

    def __init__(
        self,
        connection: HsmConnection,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        on_notice: Callable[[int, Any], None],
        on_closed: Callable[[], None],
    ) -> None:
        self._connection = connection
        self._on_notice = on_notice
        self._on_closed = on_closed
        self._sent_health: Health | None = None
        self._asked: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self.stream = FramedStream(
            sock,
            loop,
            on_frame=self._request,
            on_too_large=self._too_large,
            on_closed=self._closed,
            incoming="a relayed request",
        )

    def close(self) -> None:
        self.stream.close()
        self._forget_asked()

    def ask_metrics(self) -> asyncio.Future[Any]:
        """The extra front end's unwrap metrics (a Snapshot), when it answers."""
        future: asyncio.Future[Any] = self.stream.loop.create_future()
        if self.stream.closed:
            future.cancel()
            return future
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        self._asked[request_id] = future
        self.stream.send(wire.frame(request_id, METRICS, ()))
        return future

    def _forget_asked(self) -> None:
        asked, self._asked = self._asked, {}
        for future in asked.values():
            future.cancel()

    def answer(self, request_id: int, status: int, result: Any) -> None:
        health = self._connection.health
        update = None
        if health is not self._sent_health:
            update, self._sent_health = health.to_wire(), health
        try:
            data = wire.frame(request_id, status, (result, update, None))
        except HsmError as exc:  # an answer over the frame limit: say so instead
            data = wire.frame(
                request_id, wire.STATUS_ERROR, ((str(exc.reason), exc.message), None, None)
            )
            self._sent_health = None
        self.stream.send(data)

    def _request(self, request_id: int, op: int, args: Any) -> None:
        if request_id == NOTICE_ID:
            if op == READY:
                self._on_notice(op, args)
            return
        if op == METRICS:
            future = self._asked.pop(request_id, None)
            if future is not None and not future.done():
                future.set_result(args)
            return
        if op == wire.Op.CHECK:
            self.answer(request_id, wire.STATUS_OK, None)
            return
        if op != wire.Op.DECRYPT:
            self.answer(
                request_id,
                wire.STATUS_ERROR,
                (str(Reason.PERMISSION_DENIED), "a workload front end may only decrypt"),
            )
            return
        waiter = _Answer(self, request_id)
        try:
            self._connection.submit(wire.Op.DECRYPT, args, waiter)
        except HsmError as exc:
            waiter.set_exception(exc)

    def _too_large(self, request_id: int, error: HsmError) -> None:
        # The stream is out of step: answer, then close it (the front end is restarted).
        self.answer(request_id, wire.STATUS_ERROR, (str(error.reason), error.message))
        self._closed()

    def _closed(self) -> None:
        self.stream.close()
        self._forget_asked()
        self._on_closed()


class RelayLink:
    """An extra front end's way to the token: a :class:`kustody.sidecar.connection.TokenLink`
    over its relay to the first front end."""

    def __init__(self, sock: socket.socket, *, op_timeout: float = 30.0) -> None:
        self.health = NOT_YET
        self.snapshot: tuple[VersionInfo, ...] = ()  # KEK versions: not mirrored here
        self.closed = asyncio.Event()
        self._sock = sock
        self._timeout = op_timeout + _SLACK_SECONDS
        self._ids = itertools.count(1)
        self._pending: Pending = {}
        self._stream: FramedStream | None = None
        # What this front end answers when the first one asks for its metrics.
        self.on_metrics: Callable[[], Any] = tuple

    @property
    def token_label(self) -> str:
        return ""  # the first front end's to tell; nothing here asks

    def open(self) -> None:
        """Serve the relay from the running event loop."""
        self._stream = FramedStream(
            self._sock,
            asyncio.get_running_loop(),
            on_frame=self._frame,
            on_too_large=self._too_large,
            on_closed=self._lost,
            incoming="a relayed answer",
        )

    def notify(self, notice: int, body: Any) -> None:
        if self._stream is not None:
            self._stream.send(wire.frame(NOTICE_ID, notice, body))

    def submit(self, op: wire.Op, args: Any, waiter: Waiter) -> None:
        stream = self._stream
        if stream is None or stream.closed:
            raise HsmError(Reason.TOKEN_UNAVAILABLE, "the sidecar's first front end is gone")
        request_id = next(self._ids) & 0xFFFFFFFF or next(self._ids)
        data = wire.frame(request_id, op, args)  # REQUEST_TOO_LARGE before anything is sent
        timer = stream.loop.call_later(self._timeout, self._overdue, request_id)
        self._pending[request_id] = (waiter, timer)
        stream.send(data)

    async def request(self, op: wire.Op, args: Any) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.submit(op, args, future)
        return await future

    async def check(self, *, force: bool = False) -> Health:
        with contextlib.suppress(HsmError):
            await self.request(wire.Op.CHECK, (force,))
        return self.health

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        fail_all(self._pending, HsmError(Reason.TOKEN_UNAVAILABLE, "the front end is stopping"))

    def _frame(self, request_id: int, code: int, message: Any) -> None:
        if code == METRICS:
            if self._stream is not None:
                self._stream.send(wire.frame(request_id, METRICS, self.on_metrics()))
            return
        self._deliver(request_id, code, message)

    def _deliver(self, request_id: int, status: int, message: Any) -> None:
        result, health, _ = message
        if health is not None:
            self.health = Health.from_wire(health)
        answer(self._pending, request_id, status, result)

    def _too_large(self, request_id: int, error: HsmError) -> None:
        fail(self._pending, request_id, error)

    def _overdue(self, request_id: int) -> None:
        error = HsmError(Reason.TOKEN_UNAVAILABLE, "the sidecar's first front end did not answer")
        fail(self._pending, request_id, error)

    def _lost(self) -> None:
        if self._stream is not None:
            self._stream.close()
        self.health = Health(
            False, Reason.TOKEN_UNAVAILABLE, "the sidecar's first front end is gone"
        )
        fail_all(self._pending, HsmError(Reason.TOKEN_UNAVAILABLE, self.health.message))
        self.closed.set()
