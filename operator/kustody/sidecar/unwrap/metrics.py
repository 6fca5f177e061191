"""Unwrap metrics, registered on the sidecar's registry (served on its /metrics port).

``namespace`` is the *verified* caller's namespace ("" before authentication), never a
request field, so callers cannot inflate label cardinality; ``outcome`` is ``ok`` or a reason.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from kustody.sidecar.unwrap.audit import outcome_of

REQUESTS_SAMPLE = "kustody_unwrap_requests_total"
# A registry's samples, by family: ((family, ((sample, ((label, value), ...), value), ...)), ...)
Snapshot = tuple[tuple[str, tuple[tuple[str, tuple[tuple[str, str], ...], float], ...]], ...]

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
            "Time to serve a workload unwrap request, by result (ok, refused or cancelled)",
            ["result"],
            buckets=_BUCKETS,
            registry=registry,
        )

        self.reviews = Counter(
            "kustody_unwrap_token_reviews",
            "TokenReviews the unwrap service asked the API server for, by result (ok, refused "
            "or error); tokens refused by the review limits never get here",
            ["result"],
            registry=registry,
        )
        self.reviews_in_flight = Gauge(
            "kustody_unwrap_token_reviews_in_flight",
            "TokenReviews the unwrap service is waiting for",
            registry=registry,
        )
        for result in ("ok", "refused", "error"):
            self.reviews.labels(result)

        # Children per label set, looked up once: labels() takes a lock and builds a tuple
        # each time. Both are bounded: namespaces of verified callers x reasons, and 2.
        self._counters: dict[tuple[str, str], Any] = {}
        self._histograms = {r: self.duration.labels(r) for r in ("ok", "refused", "cancelled")}

    def observe(self, namespace: str, outcome: str, seconds: float) -> None:
        key = (namespace, outcome)
        counter = self._counters.get(key)
        if counter is None:
            counter = self._counters[key] = self.requests.labels(namespace, outcome)
        counter.inc()
        self._histograms[outcome_of(outcome)].observe(seconds)

    def review(self, result: str) -> None:
        """A TokenReview was answered: ``ok``, ``refused`` or ``error``."""
        self.reviews.labels(result).inc()


def snapshot(registry: CollectorRegistry) -> Snapshot:
    """Every sample of ``registry``, in plain tuples (they cross to the first front end)."""
    return tuple(
        (
            family.name,
            tuple(
                (s.name, tuple(sorted(s.labels.items())), float(s.value)) for s in family.samples
            ),
        )
        for family in registry.collect()
    )
