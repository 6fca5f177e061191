"""Operator scale benchmark (``make bench-operator [N=10000]`` → bench/results/operator.json).

On the local control plane with a real SoftHSM2 token and sidecar: create N DataKeys at once
and time until all are Ready with their Secrets (followed through watches, confirmed by one
LIST); then force a rotation and time until every Secret carries the new version. Sizes:
1,000 and N, or BENCH_SIZES (default 100,1000). Each repetition (BENCH_REPEAT, default 3) is
a fresh control plane, token, sidecar and operator; headline figures are the median with
min-max. Records the API requests the operator made per DataKey (its own counter), the CPU
seconds of the operator, sidecar, kube-apiserver and etcd per phase, the operator's peak RSS
(VmHWM), and then a fresh operator's cache-sync time and CPU seconds per resync over
everything created. Targets (issue #17) on 2 cores at N = 10,000: <= 60 s for each phase,
RSS <= 300 MiB. ``KUSTODY_BENCH_PYSPY=DIR`` records a py-spy profile of the operator during
each phase (``operator-N-create.txt``, ``operator-N-rotate.txt``; ``KUSTODY_BENCH_PYSPY_GIL=1``
for only the thread holding the GIL).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from kustody.dev.binaries import build
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Operator, Sidecar
from kustody.kube.api import Kube, load_api_client
from kustody.kube.informer import read_watch_lines
from kustody.kube.resources import DATAKEYS, KEYRINGS, SECRETS
from plot import plot_operator  # bench/plot.py
from unwrap import profiled  # bench/unwrap.py: py-spy while a block runs (KUSTODY_BENCH_PYSPY=DIR)

REPO = Path(__file__).resolve().parents[1]
# `make bench-operator N=10000`: sizes 1,000 and N; else BENCH_SIZES (default 100,1000).
_N = int(os.environ.get("N") or 0)
SIZES = (
    tuple(sorted({1000, _N}))
    if _N
    else tuple(int(n) for n in os.environ.get("BENCH_SIZES", "100,1000").split(","))
)
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
RESYNC_EVERY = float(os.environ.get("BENCH_RESYNC_SECONDS", "30"))  # 0: not measured
TARGET_S, TARGET_RSS = 60.0, 300.0  # issue #17, at N = 10,000 on 2 cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_calls(port: int) -> dict[str, float]:
    """The operator's API requests so far, by "VERB kind code" (its own counter)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kustody_kube_requests_total{"):
            labels, value = line.rsplit(" ", 1)
            parts = dict(re.findall(r'(\w+)="([^"]*)"', labels))
            out[f"{parts.get('verb')} {parts.get('kind')} {parts.get('code')}"] = float(value)
    return out


def _per_datakey(before: dict[str, float], after: dict[str, float], n: int) -> dict[str, float]:
    return {
        k: round((v - before.get(k, 0.0)) / n, 2)
        for k, v in sorted(after.items())
        if v - before.get(k, 0.0) > 0
    }


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


class _Tracker:
    """Follows DataKeys (full objects) and Secrets (metadata) through watches in a thread, so
    waiting for N objects costs the API server one event stream, not a LIST of N objects
    four times a second (at N = 10,000 the polling itself loaded the API server)."""

    def __init__(self, kube: Kube, ring: str) -> None:
        self.kube, self.ring = kube, ring
        self.datakeys: dict[str, tuple[int | None, bool]] = {}  # name -> (version, ready)
        self.secrets: dict[str, int | None] = {}  # name -> version label
        self.stopped = threading.Event()
        self.threads = [
            threading.Thread(target=self._follow, args=(DATAKEYS, False), daemon=True),
            threading.Thread(target=self._follow, args=(SECRETS, True), daemon=True),
        ]

    def start(self) -> _Tracker:
        for t in self.threads:
            t.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def count(self, version: int) -> tuple[int, int]:
        ready = sum(1 for v, r in list(self.datakeys.values()) if r and v == version)
        secrets = sum(1 for v in list(self.secrets.values()) if v == version)
        return ready, secrets

    def _follow(self, res: Any, metadata_only: bool) -> None:
        selector = f"kustody.io/keyring={self.ring}" if res is SECRETS else None
        version = ""
        while not self.stopped.is_set():
            try:
                if not version:  # first, or after 410 Gone: list, then watch from there
                    items, version = asyncio.run(
                        self.kube.list_metadata(res, label_selector=selector)
                    )
                    for item in items:
                        if not metadata_only:  # DataKeys: the list has no status; watch it
                            continue
                        self._record(res, item)
                version = self._watch(res, version, selector, metadata_only)
            except Exception:
                if self.stopped.is_set():
                    return
                time.sleep(0.5)

    def _watch(self, res: Any, version: str, selector: str | None, metadata_only: bool) -> str:
        response = self.kube.open_watch(
            res, version, label_selector=selector, metadata_only=metadata_only
        )
        try:
            for event in read_watch_lines(response, self.stopped):
                obj = event.get("object") or {}
                if event.get("type") == "ERROR":
                    return ""  # 410 Gone: list again
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if event.get("type") in ("ADDED", "MODIFIED"):
                    self._record(res, obj)
        finally:
            response.release_conn()
        return version

    def _record(self, res: Any, obj: dict[str, Any]) -> None:
        meta = obj.get("metadata") or {}
        name = str(meta.get("name") or "")
        if res is SECRETS:
            label = (meta.get("labels") or {}).get("kustody.io/keyring-version")
            self.secrets[name] = int(label) if label and label.isdigit() else None
            return
        status = obj.get("status") or {}
        ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in status.get("conditions") or ()
        )
        self.datakeys[name] = (status.get("keyRingVersion"), ready)


def _cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """utime + stime of each process and its reaped children (the sidecar's worker)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for name, pid in pids.items():
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = sum(int(f) for f in fields[11:15]) / tick
        for child in _children(pid):
            try:
                cf = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            out[name] += sum(int(f) for f in cf[11:13]) / tick
    return out


def _children(pid: int) -> list[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return []
    return [int(c) for c in text.split()]


def _cpu_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 1) for k in after}


async def _create(kube: Kube, namespace: str, ring: str, n: int) -> None:
    await kube.create(
        KEYRINGS,
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": ring},
            "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [namespace]}},
        },
    )
    sem = asyncio.Semaphore(32)

    async def one(i: int) -> None:
        async with sem:
            await kube.create(
                DATAKEYS,
                {
                    "apiVersion": "kustody.io/v1alpha1",
                    "kind": "DataKey",
                    "metadata": {"name": f"dk-{i:05d}", "namespace": namespace},
                    "spec": {"keyRingRef": {"name": ring}, "secretName": f"dk-{i:05d}"},
                },
                namespace,
            )

    await asyncio.gather(*(one(i) for i in range(n)))


async def _count_secrets(kube: Kube, namespace: str, version: int) -> int:
    items = await kube.list(
        SECRETS, namespace, label_selector=f"kustody.io/keyring-version={version}"
    )
    return len(items)


async def _all_ready(kube: Kube, namespace: str, n: int, version: int) -> bool:
    datakeys = await kube.list(DATAKEYS, namespace)
    ready = sum(
        1
        for d in datakeys
        if (d.get("status") or {}).get("keyRingVersion") == version
        and any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (d.get("status") or {}).get("conditions") or ()
        )
    )
    return ready == n and await _count_secrets(kube, namespace, version) == n


async def _wait(
    kube: Kube, tracker: _Tracker, namespace: str, n: int, version: int, limit: float
) -> float:
    """Seconds until the watches saw N DataKeys Ready at ``version`` and N Secrets labelled
    with it; then one LIST confirms it from the API server (not counted)."""
    started = time.monotonic()
    while time.monotonic() - started < limit:
        ready, secrets = tracker.count(version)
        if ready >= n and secrets >= n:
            took = time.monotonic() - started
            if await _all_ready(kube, namespace, n, version):
                return took
        await asyncio.sleep(0.1)
    raise SystemExit(f"N={n}: not all DataKeys reached version {version} in {limit:.0f}s")


def run_size(cluster: Cluster, procs: dict[str, int], metrics_port: int, n: int) -> dict[str, Any]:
    namespace, ring = f"bench-{n}", f"bench-{n}"
    cluster.kubectl("create", "namespace", namespace)
    kube = Kube(load_api_client(str(cluster.kubeconfig)), workers=16)
    tracker = _Tracker(kube, ring).start()

    async def phases() -> dict[str, Any]:
        calls0, cpu0 = _api_calls(metrics_port), _cpu_seconds(procs)
        t0 = time.monotonic()
        with profiled(procs["operator"], f"operator-{n}-create"):
            await _create(kube, namespace, ring, n)
            submitted = time.monotonic() - t0
            create_s = submitted + await _wait(kube, tracker, namespace, n, 1, 1800)
        calls1, cpu1 = _api_calls(metrics_port), _cpu_seconds(procs)
        t1 = time.monotonic()
        with profiled(procs["operator"], f"operator-{n}-rotate"):
            rotate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "kustody", "rotate", ring,
                "--kubeconfig", str(cluster.kubeconfig),
            )  # fmt: skip
            if await rotate.wait() != 0:
                raise SystemExit(f"kustody rotate {ring} failed")
            rotate_s = (time.monotonic() - t1) + await _wait(kube, tracker, namespace, n, 2, 1800)
        calls2, cpu2 = _api_calls(metrics_port), _cpu_seconds(procs)
        return {
            "n": n,
            "create_s": round(create_s, 2),
            "create_submit_s": round(submitted, 2),
            "rotate_s": round(rotate_s, 2),
            "api_calls_per_datakey_create": round(
                (sum(calls1.values()) - sum(calls0.values())) / n, 2
            ),
            "api_calls_per_datakey_rotate": round(
                (sum(calls2.values()) - sum(calls1.values())) / n, 2
            ),
            "api_calls_by_verb_create": _per_datakey(calls0, calls1, n),
            "api_calls_by_verb_rotate": _per_datakey(calls1, calls2, n),
            "cpu_s_create": _cpu_delta(cpu0, cpu1),
            "cpu_s_rotate": _cpu_delta(cpu1, cpu2),
        }

    try:
        return asyncio.run(phases())
    finally:
        tracker.stop()
        kube.close()


def _resync_cost(root: Path, cluster: Cluster, socket_path: Path, every: float) -> dict[str, Any]:
    """A fresh operator over everything created so far, resyncing every ``every`` seconds:
    the time to sync its caches, and its CPU seconds per resync (idle otherwise)."""
    operator = Operator(
        root / "resync", cluster, socket_path, name="resync", extra_args=("--resync", str(every))
    ).start()
    try:
        started = time.monotonic()
        operator.wait_active(timeout=600)
        synced = time.monotonic() - started
        time.sleep(every + 5)  # the first passes after the sync are startup work, not resync
        assert operator.proc.popen is not None
        pid = operator.proc.popen.pid
        before = _cpu_seconds({"operator": pid})["operator"]
        time.sleep(3 * every)
        after = _cpu_seconds({"operator": pid})["operator"]
        return {
            "startup_sync_s": round(synced, 1),
            "resync_every_s": every,
            "cpu_s_per_resync": round((after - before) / 3, 2),
            "rss_mib": round(_rss_mib(pid), 1),
        }
    finally:
        operator.stop()


def run_once(sizes: tuple[int, ...], resync: bool) -> dict[str, Any]:
    """One repetition on a fresh control plane, token, sidecar and operator."""
    binaries = build()
    with tempfile.TemporaryDirectory(prefix="kustody-bench-") as tmp:
        root = Path(tmp)
        plane = ControlPlane(root / "cp", binaries=binaries, log=lambda _: None)
        cluster = plane.start()
        sidecar = None
        operator = None
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            cluster.kubectl("wait", "--for=condition=Established", "crd", "--all")
            token = create_token(root / "token", "bench")
            sidecar = Sidecar(root / "stack", token).start()
            metrics_port = _free_port()
            operator = Operator(
                root / "stack", cluster, sidecar.socket, metrics_port=metrics_port
            ).start()
            operator.wait_active()
            assert operator.proc.popen is not None
            assert sidecar.proc.popen is not None
            procs = {
                "operator": operator.proc.popen.pid,
                "sidecar": sidecar.proc.popen.pid,
                **{k: v for k, v in plane.running().items() if k in ("kube-apiserver", "etcd")},
            }
            results = [run_size(cluster, procs, metrics_port, n) for n in sizes]
            rss = _rss_mib(operator.proc.popen.pid)
            operator.stop()
            operator = None
            idle = _resync_cost(root, cluster, sidecar.socket, RESYNC_EVERY) if resync else None
        finally:
            if operator is not None:
                operator.stop()
            if sidecar is not None:
                sidecar.stop()
            plane.stop()
    return {"sizes": results, "rss_mib": round(rss, 1), "resync": idle, "load": os.getloadavg()}


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 2),
        "min": round(min(values), 2),
        "max": round(max(values), 2),
    }


def main() -> None:
    reps = [run_once(SIZES, resync=i == 0 and RESYNC_EVERY > 0) for i in range(REPEAT)]
    rows = []
    for n in SIZES:
        runs = [next(r for r in rep["sizes"] if r["n"] == n) for rep in reps]
        row: dict[str, Any] = {"n": n, "runs": runs}
        for key in ("create_s", "rotate_s", "api_calls_per_datakey_create",
                    "api_calls_per_datakey_rotate"):  # fmt: skip
            row[key] = _spread([r[key] for r in runs])
        rows.append(row)
    biggest = rows[-1]
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count()},
        "repetitions": REPEAT,
        "load_1m_after_each": [round(rep["load"][0], 2) for rep in reps],
        "sizes": rows,
        "rss_mib": _spread([rep["rss_mib"] for rep in reps]),
        "resync": reps[0]["resync"],
        "targets": {"seconds_at_10000": TARGET_S, "rss_mib": TARGET_RSS},
    }
    path = REPO / "bench" / "results" / "operator.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    plotted = plot_operator(path)  # bench/plot.py: operator.png (time to Ready against N)

    print(f"{'N':>6} {'create s (min-max)':>22} {'rotate s (min-max)':>22} {'API/DK':>8}")
    for r in rows:
        c, t = r["create_s"], r["rotate_s"]
        api = (
            r["api_calls_per_datakey_create"]["median"]
            + r["api_calls_per_datakey_rotate"]["median"]
        )
        print(
            f"{r['n']:>6} {c['median']:>8} ({c['min']}-{c['max']}) {t['median']:>8} "
            f"({t['min']}-{t['max']}) {api:>8.2f}"
        )
    print(f"operator peak RSS: {out['rss_mib']} MiB (target <= {TARGET_RSS:.0f})")
    if out["resync"]:
        print(f"resync at N={sum(SIZES)}: {out['resync']}")
    for key in ("create_s", "rotate_s"):
        value = biggest[key]["median"]
        verdict = "meets" if value <= TARGET_S else "MISSES"
        print(f"N={biggest['n']} {key} median {value} s ({verdict} the {TARGET_S:.0f} s target)")
    print(f"wrote {path}")
    if plotted is not None:
        print(f"wrote {plotted}")


if __name__ == "__main__":
    main()
