"""Fault injection and measurement for the reliability tests and the soak (docs/reliability.md).

- :class:`LatencyRelay` — a unix-socket relay in front of the HSM sidecar that delays every
  chunk of bytes in both directions (a slow HSM, or a slow network to a remote one), and can
  hold all traffic (an HSM that stops answering) until released. Nothing is dropped or
  reordered: the operator sees exactly what the sidecar sent, late.
- :func:`sample_process` — RSS and open file descriptors of a process, from /proc.
- :func:`unwrap_all` and :func:`token_objects` — what the keys are, checked from outside the
  operator: DEKs through the sidecar, KEK objects straight from the token.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kustody.api.client import Binding, HsmClient, HsmError
from kustody.dev.softhsm import SoftHSMToken

Delay = Callable[[random.Random], float]

_CHUNK = 64 * 1024


def lognormal_delay(median: float = 0.05, p99: float = 1.0) -> Delay:
    """Per-chunk delays from a log-normal distribution with this median and 99th percentile
    (seconds): most chunks are quick, one in a hundred waits about ``p99``, a few longer."""
    mu = math.log(median)
    sigma = (math.log(p99) - mu) / 2.3263  # z of the 99th percentile
    return lambda rng: rng.lognormvariate(mu, sigma)


def constant_delay(seconds: float) -> Delay:
    return lambda _rng: seconds


@dataclass
class RelayStats:
    connections: int = 0
    chunks: int = 0
    bytes: int = 0
    delays: list[float] = field(default_factory=list)
    max_pending_bytes: int = 0  # the most bytes ever waiting in the relay at once

    def percentile(self, q: float) -> float:
        if not self.delays:
            return 0.0
        ordered = sorted(self.delays)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class LatencyRelay:
    """Listens on ``listen`` and forwards to the unix socket ``upstream``, delaying each
    chunk by ``delay(rng)`` seconds (seeded: the same run gives the same delays). Chunks of
    one direction keep their order and do not wait for each other's delays beyond that
    (each is due at max(its arrival + delay, the previous chunk's due time)).

    Runs its own event loop on a thread: ``start()``, ``stop()``, or use as a context
    manager. ``hold()`` keeps every byte in the relay until ``release()``."""

    def __init__(
        self, listen: Path, upstream: Path, delay: Delay | None = None, seed: int = 1
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self._delay = delay or lognormal_delay()
        self._rng = random.Random(seed)  # noqa: S311 - delays, not secrets
        self.stats = RelayStats()
        self._pending = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._flowing: asyncio.Event | None = None
        self._server: asyncio.AbstractServer | None = None
        self._ready = threading.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    # -- control, from any thread ------------------------------------------------------------

    def start(self) -> LatencyRelay:
        self.listen.unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._run, name="latency-relay", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the latency relay did not start")
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
            self._thread.join(10)
        self.listen.unlink(missing_ok=True)

    def hold(self) -> None:
        """Stop delivering anything, both ways (an HSM that hangs); bytes are kept."""
        self._call(lambda flowing: flowing.clear())

    def release(self) -> None:
        """Deliver what was held, and flow again."""
        self._call(lambda flowing: flowing.set())

    def __enter__(self) -> LatencyRelay:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    def _call(self, action: Callable[[asyncio.Event], None]) -> None:
        loop, flowing = self._loop, self._flowing
        if loop is None or flowing is None:
            raise RuntimeError("the latency relay is not running")
        loop.call_soon_threadsafe(action, flowing)

    # -- the relay itself, on its own loop -----------------------------------------------------

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
            self._ready.set()
            loop.run_forever()
        finally:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                loop.run_until_complete(asyncio.gather(*self._tasks, return_exceptions=True))
            loop.close()

    async def _serve(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_unix_server(self._connection, path=str(self.listen))

    async def _connection(
        self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter
    ) -> None:
        self.stats.connections += 1
        try:
            server_r, server_w = await asyncio.open_unix_connection(str(self.upstream))
        except OSError:
            client_w.close()
            return
        pumps = [
            asyncio.ensure_future(self._pump(client_r, server_w)),
            asyncio.ensure_future(self._pump(server_r, client_w)),
        ]
        for pump in pumps:
            self._tasks.add(pump)
            pump.add_done_callback(self._tasks.discard)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in pumps:
            pump.cancel()
        for writer in (client_w, server_w):
            with contextlib.suppress(Exception):
                writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            assert self._flowing is not None
            while (item := await queue.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                await self._flowing.wait()
                writer.write(data)
                self._pending -= len(data)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        last_due = 0.0
        try:
            while data := await reader.read(_CHUNK):
                delay = max(0.0, self._delay(self._rng))
                self.stats.chunks += 1
                self.stats.bytes += len(data)
                self.stats.delays.append(delay)
                self._pending += len(data)
                self.stats.max_pending_bytes = max(self.stats.max_pending_bytes, self._pending)
                last_due = max(loop.time() + delay, last_due)
                queue.put_nowait((last_due, data))
            queue.put_nowait(None)
            await sender
        finally:
            sender.cancel()
            with contextlib.suppress(Exception):
                writer.write_eof()


# -- processes ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSample:
    rss_kib: int
    fds: int


def sample_process(pid: int) -> ProcessSample | None:
    """RSS (VmRSS) and the number of open file descriptors, or None if it is gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
    )
    return ProcessSample(rss, fds)


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (e.g. the sidecar's PKCS#11 worker process)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def linear_slope(points: Iterable[tuple[float, float]]) -> float:
    """Least-squares slope of (x, y) points (0 when fewer than two)."""
    pts = list(points)
    if len(pts) < 2:
        return 0.0
    mx = sum(x for x, _ in pts) / len(pts)
    my = sum(y for _, y in pts) / len(pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return 0.0 if var == 0 else sum((x - mx) * (y - my) for x, y in pts) / var


# -- keys, checked from outside the operator ----------------------------------------------------


def unwrap_all(socket: Path, secrets: Iterable[Mapping[str, Any]]) -> dict[str, bytes]:
    """ "namespace/DataKey" → DEK, for DataKey Secrets (default entry names), through the
    sidecar. A Secret that does not open (edited, wrong binding) maps to b"" (never a DEK)."""

    async def run() -> dict[str, bytes]:
        async with HsmClient.unix(socket, timeout=60) as hsm:
            sem = asyncio.Semaphore(16)

            async def one(secret: Mapping[str, Any]) -> tuple[str, bytes]:
                data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
                ctx = json.loads(data["encryption-context"])
                binding = Binding(ctx["namespace"], ctx["dataKey"], ctx["encryptionContext"])
                async with sem:
                    try:
                        dek = await hsm.decrypt(
                            data["wrapped-key"], binding, allow_plaintext_export=True
                        )
                    except HsmError:
                        dek = b""
                return f"{ctx['namespace']}/{ctx['dataKey']}", dek

            return dict(await asyncio.gather(*(one(s) for s in secrets)))

    return asyncio.run(run())


_COUNT_OBJECTS = (
    "import collections, json, sys, pkcs11\n"
    "from pkcs11 import Attribute, ObjectClass\n"
    "lib = pkcs11.lib(sys.argv[1]); tok = lib.get_token(token_label=sys.argv[2])\n"
    "with tok.open(user_pin=open(sys.argv[3]).read().strip()) as s:\n"
    "    keys = s.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY})\n"
    "    labels = [o[Attribute.LABEL] for o in keys]\n"
    "print(json.dumps(collections.Counter(labels)))\n"
)


def token_objects(token: SoftHSMToken, ring: str) -> dict[str, int]:
    """KEK objects per label for ``ring``, counted straight from the token (in a process of
    its own: SoftHSM2 reads its configuration once per process)."""
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_OBJECTS, str(token.module), token.label, str(token.pin_file)],
        env={**token.env, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    counts: dict[str, int] = json.loads(out)
    return {k: v for k, v in counts.items() if k.startswith(f"kustody:{ring}:")}


def wait_for(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    """Poll ``check`` until it returns something truthy; AssertionError naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
