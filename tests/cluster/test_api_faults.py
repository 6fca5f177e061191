"""What the API server and a slow HSM do to the operator, each on a control plane of its own
(docs/reliability.md): kube-apiserver down for 30 s in the middle of a 1,000-DataKey rotation,
watches ending in 410 Gone after an etcd compaction, API Priority and Fairness answering 429
with Retry-After, and an HSM whose answers take up to seconds or stop coming.

Where the claim is about what reached the API server ("nothing is written twice", "backs off
as told", "listed again"), the evidence is kube-apiserver's own audit log, not the operator's.
"""

from __future__ import annotations

import collections
import contextlib
import datetime as dt
import json
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar
from kustody.testing.faults import LatencyRelay, lognormal_delay, token_objects, unwrap_all
from kustody.testing.plugin import crds_dir
from kustody_helpers import condition, eventually, get, ready

pytestmark = pytest.mark.slow

NS = "apps"
SYSTEM_NS = "kustody-system"
AUDIT_POLICY = {
    "apiVersion": "audit.k8s.io/v1",
    "kind": "Policy",
    "omitStages": ["RequestReceived", "ResponseStarted"],
    "rules": [
        {
            "level": "Metadata",
            "resources": [
                {"group": "", "resources": ["secrets", "events"]},
                {"group": "kustody.io"},
                {"group": "coordination.k8s.io", "resources": ["leases"]},
            ],
        },
        {"level": "None"},
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    plane: ControlPlane
    cluster: Cluster
    token: SoftHSMToken
    sidecar: Sidecar
    operator: Operator
    metrics_port: int
    audit_log: Path

    def apply(self, docs: list[dict[str, Any]]) -> None:
        body = json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})
        self.cluster.kubectl("apply", "--server-side", "-f", "-", input=body, timeout=300)

    def items(self, kind: str, namespace: str = NS) -> list[dict[str, Any]]:
        out = self.cluster.kubectl("get", kind, "-n", namespace, "-o", "json", timeout=300)
        return list(json.loads(out.stdout)["items"])

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def audit(self) -> list[dict[str, Any]]:
        events = []
        with contextlib.suppress(FileNotFoundError), self.audit_log.open() as fh:
            for line in fh:
                with contextlib.suppress(ValueError):
                    events.append(json.loads(line))
        return events

    def all_ready(self, n: int, timeout: float = 300, version: int | None = None) -> None:
        def check() -> bool:
            dks = self.items("datakeys")
            return len(dks) == n and all(
                ready(d) and (version is None or d["status"].get("keyRingVersion") == version)
                for d in dks
            )

        eventually(
            check, timeout, f"all {n} DataKeys Ready" + (f" on v{version}" if version else "")
        )


@contextlib.contextmanager
def _stack(
    kube: Cluster,
    tmp_path: Path,
    token: SoftHSMToken,
    *,
    watch_cache: bool = True,
    apiserver_args: tuple[str, ...] = (),
    operator_args: tuple[str, ...] = (),
    hsm_socket: Callable[[Sidecar], Path] | None = None,
    before_operator: Callable[[Cluster], None] | None = None,
) -> Iterator[Stack]:
    """A control plane of its own (audited), the sidecar and an operator with metrics."""
    audit_log = tmp_path / "audit.log"
    policy = tmp_path / "audit-policy.json"
    policy.write_text(json.dumps(AUDIT_POLICY))
    plane = ControlPlane(
        tmp_path / "plane",
        binaries=kube.binaries,
        watch_cache=watch_cache,
        extra_apiserver_args=(
            f"--audit-policy-file={policy}",
            f"--audit-log-path={audit_log}",
            *apiserver_args,
        ),
        log=lambda _: None,
    )
    cluster = plane.start()
    sidecar: Sidecar | None = None
    operator: Operator | None = None
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(crds_dir()))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        cluster.kubectl("create", "namespace", NS)
        cluster.kubectl("create", "namespace", SYSTEM_NS)
        if before_operator is not None:
            before_operator(cluster)
        sidecar = Sidecar(tmp_path / "stack", token).start()
        port = _free_port()
        operator = Operator(
            tmp_path / "stack",
            cluster,
            hsm_socket(sidecar) if hsm_socket else sidecar.socket,
            name="op",
            metrics_port=port,
            extra_args=operator_args,
        )
        operator.start().wait_active(timeout=120)
        yield Stack(plane, cluster, token, sidecar, operator, port, audit_log)
    finally:
        if operator is not None:
            with contextlib.suppress(ProcessLookupError):
                if operator.proc.popen is not None:
                    os.kill(operator.proc.popen.pid, signal.SIGCONT)
            operator.stop()
        if sidecar is not None:
            sidecar.stop()
        plane.stop()


def _keyring(name: str, policy: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [NS]}}
    if policy:
        spec["rotationPolicyRef"] = {"name": policy}
    return {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "KeyRing",
        "metadata": {"name": name},
        "spec": spec,
    }


def _datakeys(ring: str, names: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": name, "namespace": NS},
            "spec": {"keyRingRef": {"name": ring}, "secretName": name},
        }
        for name in names
    ]


def _rotate(cluster: Cluster, ring: str) -> dt.datetime:
    now = dt.datetime.now(dt.UTC)
    stamp = now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.kubectl(
        "annotate", "keyring", ring, "--overwrite", f"kustody.io/rotate-requested-at={stamp}"
    )
    return now


def _metric_sum(text: str, pattern: str) -> float:
    regex = re.compile(pattern)
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if not line.startswith("#") and regex.match(line)
    )


def _time(stamp: str) -> dt.datetime:
    return dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def _by_operator(event: dict[str, Any]) -> bool:
    """Requests made by the operator's own API client (kubectl and Kopf's watches excluded)."""
    return str(event.get("userAgent", "")).startswith("OpenAPI-Generator/")


def _lease_holder(cluster: Cluster) -> dict[str, Any]:
    out = cluster.kubectl("get", "lease", "kustody-operator", "-n", SYSTEM_NS, "-o", "json")
    return dict(json.loads(out.stdout)["spec"])


# -- kube-apiserver down for 30 s in the middle of a 1,000-DataKey rotation --------------------


def test_apiserver_down_30s_mid_rotation(
    kube: Cluster, tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]
) -> None:
    """The rotation completes, no DEK changes, each Secret is written exactly once, and the
    operator — which exits when it cannot renew its Lease for 10 s, as client-go's leader
    election does — is started again (as a kubelet would) and takes the Lease back."""
    n, ring = 1000, "outage"
    with _stack(kube, tmp_path, make_softhsm_token("apidown")) as s:
        s.apply([_keyring(ring), *_datakeys(ring, [f"dk-{i:04d}" for i in range(n)])])
        s.all_ready(n, version=1)
        before = unwrap_all(s.sidecar.socket, s.items("secrets"))
        assert len(before) == n
        assert b"" not in before.values()

        # Freeze the operator as soon as re-wraps have begun, so the outage provably lands
        # in the middle of the rotation (counted from the API while the operator is frozen).
        # Should a rotation finish before the freeze, another is started (at most three).
        popen = s.operator.proc.popen
        assert popen is not None
        target = 1
        for _attempt in range(3):
            target += 1
            started = _metric_sum(s.metrics(), r"kustody_rewraps_total")
            rotated_at = _rotate(s.cluster, ring)
            eventually(
                lambda started=started: (
                    _metric_sum(s.metrics(), r"kustody_rewraps_total") > started
                ),
                120,
                "re-wraps to begin",
            )
            os.kill(popen.pid, signal.SIGSTOP)
            done = sum(d["status"].get("keyRingVersion") == target for d in s.items("datakeys"))
            if done < n:
                break
            os.kill(popen.pid, signal.SIGCONT)
            s.all_ready(n, version=target)
        assert done < n, f"the outage must land mid-rotation ({done} of {n} re-wrapped)"
        s.plane.stop_apiserver()
        down_at = time.monotonic()
        os.kill(popen.pid, signal.SIGCONT)

        # Lost leadership: the operator exits 1 (a pod's container would be restarted).
        code = popen.wait(timeout=120)
        log = s.operator.log()
        assert code == 1, log[-3000:]
        assert "lost lease" in log
        assert "stopping: leadership lost" in log
        s.operator.start()  # like the kubelet, at once: it waits for the API server itself
        time.sleep(max(0.0, 30 - (time.monotonic() - down_at)))
        s.plane.start_apiserver()
        up_at = dt.datetime.now(dt.UTC)

        eventually(lambda: s.operator.log().count("synced") >= 2, 120, "the new operator active")
        s.all_ready(n, timeout=300, version=target)
        after = unwrap_all(s.sidecar.socket, s.items("secrets"))
        assert after == before, "a DEK changed or a Secret no longer opens"
        assert {d["status"].get("dekGeneration") for d in s.items("datakeys")} == {1}
        versions = range(1, target + 1)
        assert token_objects(s.token, ring) == {f"kustody:{ring}:v{v}": 1 for v in versions}
        lease = _lease_holder(s.cluster)
        assert lease["holderIdentity"] == "op"
        assert _time(lease["renewTime"]) > up_at

        # Nothing written twice: since the rotation, each Secret was changed by exactly one
        # successful write, none was created again, and no DataKey status written twice.
        audit = [
            e
            for e in s.audit()
            if _by_operator(e)
            and e.get("stage") == "ResponseComplete"
            and _time(e["requestReceivedTimestamp"]) >= rotated_at
            and 200 <= int((e.get("responseStatus") or {}).get("code") or 0) < 300
        ]
        secret_writes = collections.Counter(
            e["objectRef"]["name"]
            for e in audit
            if e["objectRef"].get("resource") == "secrets" and e["verb"] in ("update", "patch")
        )
        created = [
            e
            for e in audit
            if e["objectRef"].get("resource") == "secrets" and e["verb"] == "create"
        ]
        assert not created, f"Secrets created again: {created[:3]}"
        assert len(secret_writes) == n
        assert set(secret_writes.values()) == {1}, secret_writes.most_common(3)
        status_writes = collections.Counter(
            e["objectRef"]["name"]
            for e in audit
            if e["objectRef"].get("resource") == "datakeys"
            and e["objectRef"].get("subresource") == "status"
        )
        assert len(status_writes) == n
        assert set(status_writes.values()) == {1}, status_writes.most_common(3)
        print(f"outage landed with {done} of {n} DataKeys re-wrapped")


# -- 410 Gone: watches resumed after an etcd compaction must list again ------------------------


def test_watch_410_after_compaction_relists_and_misses_nothing(
    kube: Cluster, tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]
) -> None:
    """Without the watch cache every watch resumes from etcd. The operator is frozen, the
    API server restarted (its watches are gone), DataKeys are created and Secrets deleted or
    edited, and etcd is compacted past everything the operator saw: its watches resume into
    410 Gone. It must list again and act on everything it missed."""
    ring = "relist"
    with _stack(kube, tmp_path, make_softhsm_token("gone"), watch_cache=False) as s:
        s.apply([_keyring(ring), *_datakeys(ring, ["old-0", "old-1", "old-2"])])
        s.all_ready(3)
        popen = s.operator.proc.popen
        assert popen is not None
        os.kill(popen.pid, signal.SIGSTOP)
        try:
            s.plane.restart_apiserver()
            s.apply(_datakeys(ring, [f"new-{i}" for i in range(20)]))
            s.cluster.kubectl("delete", "secret", "old-0", "-n", NS)
            tamper = {"data": {"wrapped-key": "dGFtcGVyZWQ="}}
            s.cluster.kubectl(
                "patch", "secret", "old-1", "-n", NS, "--type=merge", "-p", json.dumps(tamper)
            )
            compacted = s.cluster.etcd_compact()
        finally:
            resumed_at = dt.datetime.now(dt.UTC)
            os.kill(popen.pid, signal.SIGCONT)

        s.all_ready(23, timeout=180)
        eventually(
            lambda: (
                {x["metadata"]["name"] for x in s.items("secrets")}
                >= {"old-0", *(f"new-{i}" for i in range(20))}
            ),
            120,
            "every Secret, the deleted one restored",
        )
        deks = unwrap_all(s.sidecar.socket, s.items("secrets"))
        assert len(deks) == 23
        assert b"" not in deks.values(), "a Secret does not open"
        assert popen.poll() is None, "the operator must ride this out without a restart"

        # Both informers say so: each resumed its watch from a compacted resourceVersion
        # (etcd answers 410 Gone) and listed again.
        log = s.operator.log()
        for kind in ("Secret", "DataKey"):
            assert f"{kind} watch expired (410 Gone); listing again" in log, log[-3000:]
        stale = [
            e
            for e in s.audit()
            if (e.get("objectRef") or {}).get("resource") == "datakeys"
            and e["verb"] == "watch"
            and e.get("stage") == "ResponseComplete"
            and _time(e["requestReceivedTimestamp"]) >= resumed_at
            and (rv := re.search(r"resourceVersion=(\d+)", e["requestURI"]))
            and int(rv.group(1)) < compacted
            and "kube-controller-manager" not in str(e.get("userAgent", ""))
        ]
        assert stale, "the DataKey watch did not resume from a compacted resourceVersion"
        print(f"compacted etcd at revision {compacted}; {len(stale)} stale DataKey watch(es)")


def test_datakey_deleted_while_the_watch_was_broken_is_forgotten(
    kube: Cluster, tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]
) -> None:
    ring = "ghost"
    with _stack(kube, tmp_path, make_softhsm_token("ghost"), watch_cache=False) as s:
        s.apply([_keyring(ring), *_datakeys(ring, ["a", "b", "c"])])
        s.all_ready(3)
        popen = s.operator.proc.popen
        assert popen is not None
        os.kill(popen.pid, signal.SIGSTOP)
        try:
            s.plane.restart_apiserver()
            s.cluster.kubectl("delete", "datakey", "c", "-n", NS)
            s.cluster.etcd_compact()
        finally:
            os.kill(popen.pid, signal.SIGCONT)
        eventually(lambda: "Secret watch expired (410 Gone)" in s.operator.log(), 120, "the relist")
        s.apply(_datakeys(ring, ["d"]))  # proof that Kopf has listed and watches again
        s.all_ready(3)

        def forgotten() -> bool:
            counted = _metric_sum(s.metrics(), r"kustody_datakeys\{")
            kr = get(s.cluster, "keyring", ring) or {}
            referenced = sum(v.get("dataKeys", 0) for v in kr["status"]["versions"])
            return counted == 3 and referenced == 3

        eventually(forgotten, 30, "the deleted DataKey to be forgotten")


# -- API Priority and Fairness: 429 with Retry-After for a while -------------------------------

APF_OBJECTS = [
    {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "PriorityLevelConfiguration",
        "metadata": {"name": "kustody-tiny"},
        "spec": {
            "type": "Limited",
            "limited": {
                "nominalConcurrencyShares": 1,
                "lendablePercent": 0,
                "borrowingLimitPercent": 0,
                "limitResponse": {"type": "Reject"},
            },
        },
    },
    {
        "apiVersion": "flowcontrol.apiserver.k8s.io/v1",
        "kind": "FlowSchema",
        "metadata": {"name": "kustody-throttle"},
        "spec": {
            "priorityLevelConfiguration": {"name": "kustody-tiny"},
            "matchingPrecedence": 100,
            "distinguisherMethod": {"type": "ByUser"},
            "rules": [
                {
                    "subjects": [
                        {
                            "kind": "ServiceAccount",
                            "serviceAccount": {"name": "kustody-operator", "namespace": SYSTEM_NS},
                        }
                    ],
                    # The operator's reconcile traffic; its Lease renewals stay in their own
                    # flow, as Kubernetes' own controllers' leader election does.
                    "resourceRules": [
                        {
                            "verbs": ["get", "create", "update", "patch", "delete"],
                            "apiGroups": ["", "kustody.io", "events.k8s.io"],
                            "resources": ["*"],
                            "clusterScope": True,
                            "namespaces": ["*"],
                        }
                    ],
                }
            ],
        },
    },
]


def _service_account_kubeconfig(cluster: Cluster, path: Path) -> None:
    """A kubeconfig for a cluster-admin ServiceAccount: a user APF can throttle (the admin
    certificate is in system:masters, which the exempt FlowSchema matches)."""
    cluster.kubectl("create", "serviceaccount", "kustody-operator", "-n", SYSTEM_NS)
    cluster.kubectl(
        "create", "clusterrolebinding", "kustody-operator", "--clusterrole=cluster-admin",
        f"--serviceaccount={SYSTEM_NS}:kustody-operator",
    )  # fmt: skip
    token = cluster.kubectl(
        "create", "token", "kustody-operator", "-n", SYSTEM_NS, "--duration=2h"
    ).stdout.strip()
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "c",
                "cluster": {
                    "server": cluster.server,
                    "certificate-authority": str(cluster.pki.ca_cert),
                },
            }
        ],
        "users": [{"name": "sa", "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": "sa"}}],
        "current-context": "c",
    }
    path.write_text(json.dumps(config))


def test_429_retry_after_is_honoured_and_the_operator_recovers(
    kube: Cluster, tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]
) -> None:
    n, ring = 300, "throttled"
    kubeconfig = tmp_path / "sa-kubeconfig"
    with _stack(
        kube,
        tmp_path,
        make_softhsm_token("apf"),
        # 60 seats in all: the 1-share priority level gets one seat, and rejects the rest.
        apiserver_args=("--max-requests-inflight=40", "--max-mutating-requests-inflight=20"),
        operator_args=("--kubeconfig", str(kubeconfig)),
        before_operator=lambda c: _service_account_kubeconfig(c, kubeconfig),
    ) as s:
        s.apply([_keyring(ring)])
        eventually(lambda: ready(get(s.cluster, "keyring", ring)), 60, "KeyRing Ready")
        throttled_at = dt.datetime.now(dt.UTC)
        s.apply(APF_OBJECTS)
        s.apply(_datakeys(ring, [f"dk-{i:03d}" for i in range(n)]))
        eventually(
            lambda: _metric_sum(s.metrics(), r'kustody_kube_requests_total\{.*code="429"') >= 50,
            180,
            "the operator to be throttled (429s)",
        )
        time.sleep(10)  # the fault lasts a while: the operator keeps meeting 429s
        for obj in APF_OBJECTS:
            s.cluster.kubectl("delete", obj["kind"].lower(), obj["metadata"]["name"])
        s.all_ready(n, timeout=300)
        popen = s.operator.proc.popen
        assert popen is not None
        assert popen.poll() is None, "no restart: the Lease was kept"

        # Counted: every 429 the API server sent the operator is in its own metric.
        ours = _metric_sum(s.metrics(), r'kustody_kube_requests_total\{.*code="429"')
        audit = [
            e
            for e in s.audit()
            if _by_operator(e)
            and e.get("stage") == "ResponseComplete"
            and _time(e["requestReceivedTimestamp"]) >= throttled_at
        ]
        # (All of them: with 60 seats in all, the operator's start-up LISTs can meet a 429
        # from the catch-all flow too.)
        rejected = [
            e
            for e in s.audit()
            if _by_operator(e)
            and e.get("stage") == "ResponseComplete"
            and (e.get("responseStatus") or {}).get("code") == 429
        ]
        assert rejected
        assert ours == len(rejected), (ours, len(rejected))

        # Backed off as told: after a 429 for a kind, requests of that kind stop for the
        # Retry-After (at least 1 s from APF) except those already on their way — at most one
        # per API client thread (16).
        by_resource: dict[str, list[dt.datetime]] = collections.defaultdict(list)
        for e in audit:
            by_resource[e["objectRef"].get("resource", "")].append(
                _time(e["requestReceivedTimestamp"])
            )
        worst = 0
        for e in rejected:
            at = _time(e["stageTimestamp"])
            window = (at + dt.timedelta(seconds=0.3), at + dt.timedelta(seconds=1))
            sent = sum(window[0] <= t < window[1] for t in by_resource[e["objectRef"]["resource"]])
            worst = max(worst, sent)
        assert worst <= 16, f"{worst} requests in a Retry-After window"

        # Bounded: the queue never held more than one entry per object.
        lengths = [int(m) for m in re.findall(r"\(queue (\d+)\)", s.operator.log())]
        assert lengths
        assert max(lengths) <= n + 2, max(lengths)
        assert {d["status"].get("dekGeneration") for d in s.items("datakeys")} == {1}
        assert len(s.items("secrets")) == n
        print(
            f"{len(rejected)} requests rejected with 429, all counted; at most {worst} sent in "
            f"a Retry-After window; queue at most {max(lengths)}"
        )


# -- a slow HSM: p99 of about 1 s per chunk, then one that stops answering --------------------


def test_slow_hsm_bounded_timeouts_visible_no_duplicates(
    kube: Cluster, tmp_path: Path, make_softhsm_token: Callable[[str], SoftHSMToken]
) -> None:
    n, ring = 200, "slow"
    relays: list[LatencyRelay] = []

    def through_relay(sidecar: Sidecar) -> Path:
        relay = LatencyRelay(
            tmp_path / "relay.sock", sidecar.socket, lognormal_delay(0.05, 1.0), seed=14
        )
        relays.append(relay.start())
        return relay.listen

    try:
        with _stack(kube, tmp_path, make_softhsm_token("slow"), hsm_socket=through_relay) as s:
            relay = relays[0]
            s.apply([_keyring(ring), *_datakeys(ring, [f"dk-{i:03d}" for i in range(n)])])
            s.all_ready(n, timeout=300, version=1)
            before = unwrap_all(s.sidecar.socket, s.items("secrets"))
            _rotate(s.cluster, ring)
            s.all_ready(n, timeout=300, version=2)

            # The HSM stops answering (the relay holds every byte): past the operator's
            # 10 s deadline, new DataKeys and the KeyRing say so in their conditions.
            relay.hold()
            s.apply(_datakeys(ring, [f"late-{i}" for i in range(5)]))
            for i in range(5):
                stuck = eventually(
                    lambda i=i: (
                        (o := get(s.cluster, "datakey", f"late-{i}", NS))
                        and condition(o, "Ready").get("reason") == "HSMUnavailable"
                        and o
                    ),
                    120,
                    f"late-{i} to report HSMUnavailable",
                )
                assert condition(stuck, "Ready")["status"] == "False"
            kr = eventually(
                lambda: (
                    (o := get(s.cluster, "keyring", ring))
                    and condition(o, "HSMReachable").get("status") == "False"
                    and o
                ),
                120,
                "the KeyRing to report HSMReachable=False",
            )
            assert condition(kr, "Ready")["reason"] == "HSMUnavailable"
            relay.release()

            s.all_ready(n + 5, timeout=300)
            eventually(
                lambda: (
                    condition(get(s.cluster, "keyring", ring), "HSMReachable").get("status")
                    == "True"
                ),
                120,
                "HSMReachable=True again",
            )
            after = unwrap_all(s.sidecar.socket, s.items("secrets"))
            assert {k: after[k] for k in before} == before, "a DEK changed during the rotation"
            assert len(set(after.values())) == n + 5
            assert b"" not in after.values()
            assert {d["status"].get("dekGeneration") for d in s.items("datakeys")} == {1}
            assert token_objects(s.token, ring) == {
                f"kustody:{ring}:v1": 1,
                f"kustody:{ring}:v2": 1,
            }
            # The harness did what it says, and the operator never piled work up in front of
            # the HSM: what waited in the relay at once stayed small (bounded by its workers).
            p50, p99 = relay.stats.percentile(0.5), relay.stats.percentile(0.99)
            assert 0.02 < p50 < 0.2, p50
            assert 0.4 < p99 < 2.5, p99
            assert relay.stats.max_pending_bytes < 4 * 1024 * 1024, relay.stats.max_pending_bytes
            print(
                f"relay: {relay.stats.chunks} chunks, p50 {p50 * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms, at most {relay.stats.max_pending_bytes} bytes waiting"
            )
    finally:
        for relay in relays:
            relay.stop()
