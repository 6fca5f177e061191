"""Unwrap on every core: the first front end starts, watches and stops the extra ones.

One Python process serves about one core's worth of unwrap calls (TLS, HTTP/2 and gRPC are
most of a call's cost, see docs/unwrap.md). With ``--workload-front-ends N`` the sidecar runs
the unwrap service in N processes on one port: this one (which also owns the PKCS#11 worker
and serves the operator, KMS v2 and /metrics) and N-1 extra front ends
(:mod:`kustody.sidecar.unwrap.frontend`), each bound with ``SO_REUSEPORT`` so the kernel
spreads new connections over them, each decrypting through a relay to this process
(:mod:`kustody.sidecar.relay`). The default is the cores this process may use (its CPU
affinity, capped by a cgroup CPU limit).

An extra front end that exits is started again with backoff (0.1 s doubling to 10 s, reset
after 10 s of life), like the PKCS#11 worker; meanwhile the others, this one included, take
the new connections. Its unwrap metrics are asked for at each scrape and summed into this
process's (:class:`FrontEndMetrics`), so /metrics shows the service as a whole, plus
``kustody_unwrap_front_ends`` and requests per front end.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from kustody.sidecar.connection import HsmConnection, exit_text
from kustody.sidecar.relay import READY, RelayPort
from kustody.sidecar.unwrap.metrics import REQUESTS_SAMPLE, Snapshot, snapshot
from kustody.sidecar.unwrap.server import WorkloadConfig
from kustody.sidecar.unwrap.tokens import ReviewLimits

log = logging.getLogger(__name__)

_FIRST_BACKOFF = 0.1
_MAX_BACKOFF = 10.0
_STABLE_AFTER = 10.0
_SCRAPE_WAIT = 1.0  # seconds a scrape waits for the extra front ends' metrics


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU limit
    (``cpu.max``), at least 1."""
    cores = len(os.sched_getaffinity(0))
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, math.ceil(int(quota) / int(period)))
    return max(1, cores)


def shared_limits(limits: ReviewLimits, front_ends: int) -> ReviewLimits:
    """Each front end's share of the limits that protect the API server (new tokens reviewed
    in total, and in flight), so that N front ends together keep the configured totals.
    The per-address limit stays per front end (a client's connections may land on any)."""
    if front_ends <= 1:
        return limits
    return dataclasses.replace(
        limits,
        rate=limits.rate / front_ends,
        burst=max(1.0, limits.burst / front_ends),
        in_flight=max(1, limits.in_flight // front_ends),
    )


def settings_document(
    config: WorkloadConfig, *, kubeconfig: str | None, log_level: str
) -> dict[str, Any]:
    """What an extra front end is told on its standard input (paths and numbers only)."""
    document = dataclasses.asdict(config)
    document.update(
        tls_cert=str(config.tls_cert),
        tls_key=str(config.tls_key),
        kubeconfig=kubeconfig,
        log_level=log_level,
    )
    return document


def config_from_document(document: Mapping[str, Any]) -> WorkloadConfig:
    fields = {f.name for f in dataclasses.fields(WorkloadConfig)}
    values = {k: v for k, v in document.items() if k in fields}
    values["tls_cert"] = Path(values["tls_cert"])
    values["tls_key"] = Path(values["tls_key"])
    values["review_limits"] = ReviewLimits(**values["review_limits"])
    return WorkloadConfig(**values)


@dataclasses.dataclass
class _Slot:
    number: int
    process: subprocess.Popen[bytes] | None = None
    port: RelayPort | None = None
    ready: bool = False
    started: float = 0.0
    failures: int = 0
    restart: asyncio.TimerHandle | None = None


class FrontEnds:
    """The extra front ends (slots 1..N-1); slot 0 is this process."""

    def __init__(self, count: int, connection: HsmConnection) -> None:
        self.count = count
        self._connection = connection
        self._document = b"{}"
        self._slots = [_Slot(n) for n in range(1, count)]
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.metrics = FrontEndMetrics(self)

    def running(self) -> int:
        """Front ends serving now, this one included."""
        return 1 + sum(slot.ready for slot in self._slots)

    def pids(self) -> list[int]:
        return [s.process.pid for s in self._slots if s.process is not None and s.ready]

    async def start(self, document: Mapping[str, Any]) -> None:
        """Start the extra front ends with these settings (:func:`settings_document`)."""
        self._document = json.dumps(dict(document)).encode()
        self._loop = asyncio.get_running_loop()
        for slot in self._slots:
            self._spawn(slot)

    async def wait_ready(self, within: float) -> bool:
        """Until every extra front end listens (False if not within ``within`` seconds)."""
        deadline = time.monotonic() + within
        while self.running() < self.count:
            self._changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        for slot in self._slots:
            if slot.restart is not None:
                slot.restart.cancel()
            if slot.port is not None:
                slot.port.close()  # EOF: the front end stops serving and exits
        await asyncio.gather(*(asyncio.to_thread(self._reap, s, grace) for s in self._slots))

    async def snapshots(self) -> dict[int, Snapshot]:
        """Each ready extra front end's unwrap metrics (those that answer in time)."""
        asked = {s.number: s.port.ask_metrics() for s in self._slots if s.ready and s.port}
        if not asked:
            return {}
        await asyncio.wait(asked.values(), timeout=_SCRAPE_WAIT)
        out: dict[int, Snapshot] = {}
        for number, future in asked.items():
            if future.done() and not future.cancelled():
                out[number] = future.result()
            else:
                future.cancel()
        return out

    # -- the processes ---------------------------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        loop = self._loop
        assert loop is not None
        slot.restart = None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        command = [
            sys.executable, "-m", "kustody.sidecar.unwrap.frontend",
            "--fd", str(theirs.fileno()), "--parent", str(os.getpid()),
            "--slot", str(slot.number),
        ]  # fmt: skip
        try:
            process = subprocess.Popen(command, pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE)
        except OSError as exc:
            ours.close()
            self._schedule(slot, f"could not start ({exc.strerror})")
            return
        finally:
            theirs.close()
        assert process.stdin is not None
        with contextlib.suppress(BrokenPipeError):
            process.stdin.write(self._document)
        with contextlib.suppress(BrokenPipeError):
            process.stdin.close()
        slot.process, slot.started, slot.ready = process, time.monotonic(), False
        slot.port = RelayPort(
            self._connection,
            ours,
            loop,
            on_notice=lambda op, _: self._notice(slot, op),
            on_closed=lambda: self._exited(slot),
        )
        log.debug("started workload front end %d (process %d)", slot.number, process.pid)

    def _notice(self, slot: _Slot, op: int) -> None:
        if op == READY and not slot.ready:
            slot.ready = True
            log.info("workload front end %d (process %d) is serving", slot.number, self._pid(slot))
            self._changed.set()

    def _exited(self, slot: _Slot) -> None:
        slot.ready = False
        self._changed.set()
        if slot.port is not None:
            slot.port.close()
            slot.port = None
        self.metrics.retire(slot.number)
        if self._loop is not None and not self._stopping:
            # The process may take a moment to exit after its relay closed: wait for it off
            # the event loop (which serves the operator and the KMS plugin meanwhile).
            task = self._loop.create_task(self._restart_after_exit(slot))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _restart_after_exit(self, slot: _Slot) -> None:
        code = await asyncio.to_thread(self._reap, slot, 2.0)
        if self._stopping:
            return
        if time.monotonic() - slot.started >= _STABLE_AFTER:
            slot.failures = 0
        self._schedule(slot, f"exited ({exit_text(code)})")

    def _schedule(self, slot: _Slot, why: str) -> None:
        delay = min(_MAX_BACKOFF, _FIRST_BACKOFF * 2**slot.failures)
        slot.failures += 1
        log.error("workload front end %d %s; starting it again in %.1fs", slot.number, why, delay)
        loop = self._loop
        if loop is not None and not loop.is_closed() and not self._stopping:
            slot.restart = loop.call_later(delay, self._spawn, slot)

    @staticmethod
    def _pid(slot: _Slot) -> int:
        return slot.process.pid if slot.process is not None else 0

    @staticmethod
    def _reap(slot: _Slot, timeout: float) -> int | None:
        process = slot.process
        if process is None:
            return None
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            return process.wait()


Key = tuple[str, tuple[tuple[str, str], ...]]


class FrontEndMetrics(Collector):
    """The unwrap metrics of all front ends as one: this process's (``own``, a registry of its
    own, not served) plus each extra front end's, asked for at scrape time. A front end that
    exits leaves its counts behind (``retire``), so the sums never go down."""

    def __init__(self, front_ends: FrontEnds) -> None:
        self.own = CollectorRegistry()
        self._front_ends = front_ends
        self._last: dict[int, dict[Key, float]] = {}  # the latest answer of each front end
        self._retired: dict[Key, float] = {}  # counts of front ends that exited
        self._retired_requests: dict[int, float] = {}
        self._lock = threading.Lock()

    def retire(self, number: int) -> None:
        with self._lock:
            last = self._last.pop(number, {})
            for key, value in last.items():
                if _cumulative(key[0]):
                    self._retired[key] = self._retired.get(key, 0.0) + value
            self._retired_requests[number] = self._retired_requests.get(number, 0.0) + sum(
                v for (name, _), v in last.items() if name == REQUESTS_SAMPLE
            )

    def _refresh(self) -> None:
        loop = self._front_ends._loop
        if loop is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # called on the event loop itself: use the last answers
            return
        future = asyncio.run_coroutine_threadsafe(self._front_ends.snapshots(), loop)
        try:
            answers = future.result(timeout=_SCRAPE_WAIT + 1.0)
        except Exception:  # the loop is busy or stopping: the last answers stand
            future.cancel()
            return
        with self._lock:
            for number, answer in answers.items():
                self._last[number] = dict(_flatten(answer))

    def collect(self) -> Iterator[Metric]:
        self._refresh()
        with self._lock:
            others = [*self._last.values(), self._retired]
            per_front_end = {
                number: self._retired_requests.get(number, 0.0)
                + sum(v for (name, _), v in self._last.get(number, {}).items()
                      if name == REQUESTS_SAMPLE)
                for number in range(1, self._front_ends.count)
            }  # fmt: skip
        own = dict(_flatten(snapshot(self.own)))
        for family in self.own.collect():
            merged = Metric(family.name, family.documentation, family.type, family.unit)
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                values = [sample.value, *(o[key] for o in others if key in o)]
                total = min(values) if sample.name.endswith("_created") else sum(values)
                merged.add_sample(sample.name, dict(key[1]), total)
            extra = _missing(family.name, own, others)
            for name, labels, value in extra:
                merged.add_sample(name, labels, value)
            yield merged
        served = Metric(
            "kustody_unwrap_front_ends", "Workload front-end processes serving", "gauge"
        )
        served.add_sample("kustody_unwrap_front_ends", {}, float(self._front_ends.running()))
        yield served
        requests = Metric(
            "kustody_unwrap_front_end_requests",
            "Workload unwrap requests by the front-end process that served them "
            "(0: the one that owns the PKCS#11 worker)",
            "counter",
        )
        per_front_end[0] = sum(v for (name, _), v in own.items() if name == REQUESTS_SAMPLE)
        for number in sorted(per_front_end):
            requests.add_sample(
                "kustody_unwrap_front_end_requests_total",
                {"front_end": str(number)},
                per_front_end[number],
            )
        yield requests


def _cumulative(sample: str) -> bool:
    """Counter and histogram samples carry over when a front end exits; gauges do not."""
    return sample.endswith(("_total", "_bucket", "_count", "_sum"))


def _of_family(sample: str, family: str) -> bool:
    suffix = sample.removeprefix(family)
    return suffix != sample and suffix in ("", "_total", "_created", "_bucket", "_count", "_sum")


def _flatten(answer: Snapshot) -> Iterable[tuple[Key, float]]:
    for _, samples in answer:
        for name, labels, value in samples:
            yield (name, tuple(tuple(pair) for pair in labels)), float(value)  # type: ignore[misc]


def _missing(
    family: str, own: Mapping[Key, float], others: list[dict[Key, float]]
) -> list[tuple[str, dict[str, str], float]]:
    """Samples other front ends have and this one does not (a label set only they saw),
    summed: e.g. requests from a namespace whose pods all landed elsewhere."""
    totals: dict[Key, float] = {}
    for other in others:
        for key, value in other.items():
            if key in own or not _of_family(key[0], family):
                continue
            if key[0].endswith("_created"):
                totals[key] = min(totals.get(key, value), value)
            else:
                totals[key] = totals.get(key, 0.0) + value
    return [(name, dict(labels), value) for (name, labels), value in sorted(totals.items())]
