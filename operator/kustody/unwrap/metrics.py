"""Unwrap metrics, registered on the sidecar's registry (served on its /metrics port).

``namespace`` is the *verified* caller's namespace ("" before authentication), never a
request field, so callers cannot inflate label cardinality; ``outcome`` is ``ok`` or a reason.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class UnwrapMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "kustody_unwrap_requests",
            "Workload unwrap requests by the caller's namespace and outcome (ok or a reason)",
            ["namespace", "outcome"],
            registry=registry,
        )
        self.duration = Histogram(
            "kustody_unwrap_duration_seconds",
            "Time to serve a workload unwrap request, by result (ok or refused)",
            ["result"],
            buckets=_BUCKETS,
            registry=registry,
        )

    def observe(self, namespace: str, outcome: str, seconds: float) -> None:
        self.requests.labels(namespace, outcome).inc()
        self.duration.labels("ok" if outcome == "ok" else "refused").observe(seconds)
