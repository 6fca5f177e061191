"""A non-blocking stream of :mod:`kustody.api.wire` frames on one socket, served by one event
loop: the front end's end of its PKCS#11 worker's socketpair, and either end of a relay
between front-end processes (:mod:`kustody.sidecar.relay`).

Frames are decoded as they arrive and handed to ``on_frame(request_id, code, body)``; a frame
over :data:`kustody.api.wire.MAX_BODY_BYTES` is never buffered: ``on_too_large(request_id,
error)`` is told and its body is dropped as it arrives. ``on_closed()`` runs once, on EOF or
a socket error. Writes that do not fit the socket buffer wait in a buffer of their own.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

from kustody.api import wire
from kustody.api.errors import HsmError

_RECV_BYTES = 1 << 16  # recv() allocates this much each call: 256 KiB cost 15 us a call, 64 KiB 2.5

OnFrame = Callable[[int, int, Any], None]
OnTooLarge = Callable[[int, HsmError], None]


class FramedStream:
    def __init__(
        self,
        sock: socket.socket,
        loop: asyncio.AbstractEventLoop,
        *,
        on_frame: OnFrame,
        on_too_large: OnTooLarge,
        on_closed: Callable[[], None],
        incoming: str = "a frame",
    ) -> None:
        self.sock = sock
        self._incoming = incoming  # what a frame over the limit is called in the error
        self.loop = loop
        self.closed = False
        self._on_frame = on_frame
        self._on_too_large = on_too_large
        self._on_closed = on_closed
        self._fd = sock.fileno()
        self._rbuf = bytearray()
        self._wbuf = bytearray()
        self._skip = 0  # bytes still to drop of a frame over the limit
        sock.setblocking(False)
        loop.add_reader(self._fd, self._readable)

    def rebind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve this socket from another event loop (tests run one loop per call)."""
        old = self.loop
        if not old.is_closed():
            old.remove_reader(self._fd)
            old.remove_writer(self._fd)
        self.loop = loop
        loop.add_reader(self._fd, self._readable)
        if self._wbuf:
            loop.add_writer(self._fd, self._writable)

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if self._wbuf:
            self._wbuf += data
            return
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self.loop.call_soon(self._lost)
            return
        if sent < len(data):
            self._wbuf += memoryview(data)[sent:]
            self.loop.add_writer(self._fd, self._writable)

    def close(self) -> None:
        """Stop serving the socket and close it (``on_closed`` is not called)."""
        if self.closed:
            return
        self.closed = True
        if not self.loop.is_closed():
            self.loop.remove_reader(self._fd)
            self.loop.remove_writer(self._fd)
        self.sock.close()

    def _lost(self) -> None:
        if not self.closed:
            self._on_closed()

    def _writable(self) -> None:
        try:
            sent = self.sock.send(self._wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._lost()
            return
        del self._wbuf[:sent]
        if not self._wbuf:
            self.loop.remove_writer(self._fd)

    def _readable(self) -> None:
        try:
            data = self.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._lost()
            return
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        buf = self._rbuf
        buf += data
        pos, size_all = 0, len(buf)
        unpack = wire.HEADER.unpack_from
        limit = wire.MAX_BODY_BYTES
        while size_all - pos >= wire.HEADER_BYTES and not self.closed:
            size, request_id, code = unpack(buf, pos)
            start = pos + wire.HEADER_BYTES
            if size > limit:
                # Never buffer it: say so, drop its body as it arrives.
                self._on_too_large(request_id, wire.too_large(size, self._incoming))
                self._skip = max(0, start + size - size_all)
                pos = min(start + size, size_all)
                continue
            end = start + size
            if end > size_all:
                break
            self._on_frame(request_id, code, wire.load(buf[start:end]))
            pos = end
        if pos and not self.closed:
            del buf[:pos]
