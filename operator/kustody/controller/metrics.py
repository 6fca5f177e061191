"""The operator's Prometheus metrics.

Gauges about objects are computed at scrape time from the in-memory stores, so they can never
drift from what the operator sees (no stale label sets after a KeyRing is deleted). No label
or value ever carries key material: only names, states, counts and times.
"""

from __future__ import annotations

import collections
import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from kustody.controller.store import Store
from kustody.domain import keyset
from kustody.domain.conditions import find
from kustody.domain.keyset import GenerationState
from kustody.domain.lifecycle import State
from kustody.domain.timestamps import parse_time

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class _QueueCollector(Collector):
    def __init__(self, depth: Callable[[], int]) -> None:
        self._depth = depth

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "kustody_workqueue_depth",
            "Objects waiting to be reconciled (one entry per object at most)",
            value=float(self._depth()),
        )


class _ObjectCollector(Collector):
    def __init__(self, keyrings: Store, datakeys: Store, clock: Callable[[], dt.datetime]) -> None:
        self._keyrings = keyrings
        self._datakeys = datakeys
        self._clock = clock

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock()
        versions = GaugeMetricFamily(
            "kustody_keyring_versions",
            "KEK versions by KeyRing and state",
            labels=["keyring", "state"],
        )
        next_rotation = GaugeMetricFamily(
            "kustody_keyring_next_rotation_timestamp_seconds",
            "When the KeyRing's next scheduled rotation is due (Unix time)",
            labels=["keyring"],
        )
        primary_age = GaugeMetricFamily(
            "kustody_keyring_primary_age_seconds",
            "Age of the KeyRing's primary version",
            labels=["keyring"],
        )
        ready = GaugeMetricFamily(
            "kustody_keyring_ready", "1 when the KeyRing is Ready", labels=["keyring"]
        )
        for kr in self._keyrings.values():
            name = str(kr["metadata"]["name"])
            status: dict[str, Any] = kr.get("status") or {}
            counts = collections.Counter(str(v.get("state")) for v in status.get("versions") or ())
            for state in State:
                versions.add_metric([name, str(state)], float(counts[str(state)]))
            if (at := parse_time(status.get("nextRotationAt"))) is not None:
                next_rotation.add_metric([name], at.timestamp())
            primary = status.get("primaryVersion")
            for v in status.get("versions") or ():
                if v.get("version") == primary and (created := parse_time(v.get("createdAt"))):
                    primary_age.add_metric([name], (now - created).total_seconds())
            cond = find(status.get("conditions") or (), "Ready")
            ready.add_metric([name], 1.0 if cond and cond.get("status") == "True" else 0.0)
        yield from (versions, next_rotation, primary_age, ready)

        datakeys = GaugeMetricFamily(
            "kustody_datakeys", "DataKeys by readiness", labels=["ready", "reason"]
        )
        by_ready: collections.Counter[tuple[str, str]] = collections.Counter()
        for dk in self._datakeys.values():
            cond = find((dk.get("status") or {}).get("conditions") or (), "Ready")
            status_text = str(cond.get("status")) if cond else "Unknown"
            reason = str(cond.get("reason")) if cond else "Pending"
            by_ready[(status_text.lower(), reason)] += 1
        for (ready_text, reason), count in sorted(by_ready.items()):
            datakeys.add_metric([ready_text, reason], float(count))
        yield datakeys

        generations = GaugeMetricFamily(
            "kustody_dek_generations_in_keysets",
            "DEK generations in DataKeys' keysets, by state (Primary, DecryptOnly, "
            "RemovalScheduled)",
            labels=["state"],
        )
        by_state: collections.Counter[str] = collections.Counter()
        for dk in self._datakeys.values():
            status = dk.get("status") or {}
            uid = str((dk.get("metadata") or {}).get("uid") or "")
            by_state.update(str(g.state) for g in keyset.from_status(status, uid))
        for generation_state in GenerationState:
            generations.add_metric([str(generation_state)], float(by_state[str(generation_state)]))
        yield generations


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.rotations = Counter(
            "kustody_rotations", "KeyRing rotations by outcome", ["outcome"], registry=self.registry
        )
        self.rewraps = Counter(
            "kustody_rewraps",
            "DataKeys re-wrapped under a new primary version",
            registry=self.registry,
        )
        self.generations = Counter(
            "kustody_dek_generations",
            "Data keys generated (new DEK material)",
            registry=self.registry,
        )
        self.generations_removed = Counter(
            "kustody_dek_generations_removed",
            "DEK generations removed from a keyset after their staged removal (spec.retention)",
            registry=self.registry,
        )
        self.adoptions = Counter(
            "kustody_datakey_adoptions",
            "Existing Secrets (a rebuild, a backup restore) a re-created DataKey adopted or "
            "refused after the sidecar checked them",
            ["outcome"],
            registry=self.registry,
        )
        self.escrow_exports = Counter(
            "kustody_escrow_exports",
            "Escrow packages made inside the token (exported) or refused by it, per KeyRing "
            "version and agent",
            ["outcome"],
            registry=self.registry,
        )
        self.secret_write_failures = Counter(
            "kustody_secret_write_failures",
            "DataKey Secret writes the API server refused or stored differently",
            registry=self.registry,
        )
        self.lifecycle = Counter(
            "kustody_version_transitions",
            "KEK version state changes made by the operator",
            ["to"],
            registry=self.registry,
        )
        self.reconcile = Histogram(
            "kustody_reconcile_duration_seconds",
            "Time of one reconcile pass",
            ["kind", "outcome"],
            buckets=_BUCKETS,
            registry=self.registry,
        )
        self.hsm_requests = Counter(
            "kustody_hsm_requests",
            "Requests the operator made to the HSM sidecar, by operation and outcome",
            ["op", "outcome"],
            registry=self.registry,
        )
        self.kube_requests = Counter(
            "kustody_kube_requests",
            "Requests the operator's reconcilers made to the API server",
            ["verb", "kind", "code"],
            registry=self.registry,
        )
        self.hsm_up = Counter(
            "kustody_hsm_health_checks",
            "Sidecar health checks by result",
            ["result"],
            registry=self.registry,
        )

    def watch_objects(
        self, keyrings: Store, datakeys: Store, clock: Callable[[], dt.datetime]
    ) -> None:
        self.registry.register(_ObjectCollector(keyrings, datakeys, clock))

    def watch_queue(self, depth: Callable[[], int]) -> None:
        """``kustody_workqueue_depth``: objects waiting to be reconciled (at most one entry
        per object, so it is bounded by the number of objects)."""
        self.registry.register(_QueueCollector(depth))

    def observe_kube(self, verb: str, kind: str, code: int, _seconds: float) -> None:
        self.kube_requests.labels(verb, kind, str(code)).inc()

    def serve(self, port: int, address: str = "0.0.0.0") -> Any:  # noqa: S104 - a metrics port
        server, _thread = start_http_server(port, addr=address, registry=self.registry)
        return server
