"""Prometheus metrics of the sidecar, on its own registry (several sidecars may share a process).

Labels carry operation names, outcomes (a :class:`Reason` or ``ok``), KeyRing names and
states: never key material.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kustody.domain.keyversion import VersionState
from kustody.sidecar.connection import HsmConnection

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _TokenCollector(Collector):
    """Versions by state and token health, read at scrape time from memory (no HSM call)."""

    def __init__(self, connection: HsmConnection) -> None:
        self._connection = connection

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily(
            "kustody_hsm_token_up", "1 while the sidecar is logged in to a working token"
        )
        up.add_metric([], 1.0 if self._connection.health.serving else 0.0)
        yield up
        versions = GaugeMetricFamily(
            "kustody_hsm_key_versions",
            "KEK versions in the token by KeyRing and state",
            labels=["keyring", "state"],
        )
        counts: collections.Counter[tuple[str, str]] = collections.Counter()
        for info in self._connection.snapshot:
            counts[(info.ref.key_ring, str(info.state))] += 1
        for ring in sorted({ring for ring, _ in counts}):
            for state in VersionState:
                versions.add_metric([ring, str(state)], float(counts[(ring, str(state))]))
        yield versions


class Metrics:
    def __init__(self, connection: HsmConnection) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kustody_hsm_requests",
            "Sidecar operations by operation and outcome (ok or a reason)",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "kustody_hsm_request_duration_seconds",
            "Time to serve a sidecar operation",
            ["op"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_TokenCollector(connection))
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms: dict[str, Any] = {}

    def observe(self, op: str, outcome: str, seconds: float) -> None:
        # Children cached per label set (labels() takes a lock and builds a tuple each call);
        # both sets are bounded (operations x reasons).
        counter = self._counters.get((op, outcome))
        if counter is None:
            counter = self._counters[(op, outcome)] = self.requests.labels(op, outcome)
        counter.inc()
        histogram = self._histograms.get(op)
        if histogram is None:
            histogram = self._histograms[op] = self.duration.labels(op)
        histogram.observe(seconds)

    def serve(self, port: int, address: str) -> Any:
        """Serve /metrics over HTTP; returns the server (``shutdown()`` stops it)."""
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server
