"""Operator scale benchmark (``make bench-operator`` → bench/results/operator.json).

On the local control plane with a real SoftHSM2 token and sidecar: create N DataKeys at once
and time until all are Ready with their Secrets; then force a rotation and time until every
Secret carries the new version. N = 100 and 1,000. Records the API requests the operator's
reconcilers made per DataKey (from its own counter) and the operator's peak RSS (VmHWM).
Targets on 2 cores at N = 1,000: ≤ 30 s for each phase, RSS ≤ 200 MiB.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from kustody.dev.binaries import build
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Operator, Sidecar
from kustody.kube.api import Kube, load_api_client
from kustody.kube.resources import DATAKEYS, KEYRINGS, SECRETS
from plot import plot_operator  # bench/plot.py

REPO = Path(__file__).resolve().parents[1]
SIZES = tuple(int(n) for n in os.environ.get("BENCH_SIZES", "100,1000").split(","))
TARGET_S, TARGET_RSS = 30.0, 200.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _api_calls(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("kustody_kube_requests_total{")
    )


def _rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else float("nan")


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


async def _wait(kube: Kube, namespace: str, n: int, version: int, limit: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if await _all_ready(kube, namespace, n, version):
            return time.monotonic() - started
        await asyncio.sleep(0.25)
    raise SystemExit(f"N={n}: not all DataKeys reached version {version} in {limit:.0f}s")


def run_size(cluster: Cluster, operator: Operator, metrics_port: int, n: int) -> dict[str, Any]:
    namespace, ring = f"bench-{n}", f"bench-{n}"
    cluster.kubectl("create", "namespace", namespace)
    kube = Kube(load_api_client(str(cluster.kubeconfig)), workers=16)

    async def phases() -> dict[str, Any]:
        calls0 = _api_calls(metrics_port)
        t0 = time.monotonic()
        await _create(kube, namespace, ring, n)
        submitted = time.monotonic() - t0
        create_s = submitted + await _wait(kube, namespace, n, 1, 600)
        calls1 = _api_calls(metrics_port)
        t1 = time.monotonic()
        rotate = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kustody", "rotate", ring,
            "--kubeconfig", str(cluster.kubeconfig),
        )  # fmt: skip
        if await rotate.wait() != 0:
            raise SystemExit(f"kustody rotate {ring} failed")
        rotate_s = (time.monotonic() - t1) + await _wait(kube, namespace, n, 2, 600)
        calls2 = _api_calls(metrics_port)
        return {
            "n": n,
            "create_s": round(create_s, 2),
            "create_submit_s": round(submitted, 2),
            "rotate_s": round(rotate_s, 2),
            "api_calls_per_datakey_create": round((calls1 - calls0) / n, 2),
            "api_calls_per_datakey_rotate": round((calls2 - calls1) / n, 2),
        }

    try:
        return asyncio.run(phases())
    finally:
        kube.close()


def main() -> None:
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
            results = [run_size(cluster, operator, metrics_port, n) for n in SIZES]
            assert operator.proc.popen is not None
            rss = _rss_mib(operator.proc.popen.pid)
        finally:
            if operator is not None:
                operator.stop()
            if sidecar is not None:
                sidecar.stop()
            plane.stop()

    by_n = {r["n"]: r for r in results}
    biggest = by_n[max(by_n)]
    out: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "load_1m_at_end": os.getloadavg()[0]},
        "sizes": results,
        "rss_mib": round(rss, 1),
        "api_calls_per_datakey": round(
            biggest["api_calls_per_datakey_create"] + biggest["api_calls_per_datakey_rotate"], 2
        ),
        "targets": {"seconds_at_1000": TARGET_S, "rss_mib": TARGET_RSS},
    }
    if 1000 in by_n:
        out["create_1000_s"] = by_n[1000]["create_s"]
        out["rotate_1000_s"] = by_n[1000]["rotate_s"]
    path = REPO / "bench" / "results" / "operator.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    plotted = plot_operator(path)  # bench/plot.py: operator.png (time to Ready against N)

    print(f"{'N':>6} {'create s':>9} {'rotate s':>9} {'API/DK create':>14} {'API/DK rotate':>14}")
    for r in results:
        print(
            f"{r['n']:>6} {r['create_s']:>9} {r['rotate_s']:>9} "
            f"{r['api_calls_per_datakey_create']:>14} {r['api_calls_per_datakey_rotate']:>14}"
        )
    print(f"operator peak RSS: {out['rss_mib']} MiB (target ≤ {TARGET_RSS:.0f})")
    for key in ("create_1000_s", "rotate_1000_s"):
        if key in out:
            verdict = "meets" if out[key] <= TARGET_S else "MISSES"
            print(f"{key} = {out[key]} s ({verdict} the {TARGET_S:.0f} s target)")
    print(f"wrote {path}")
    if plotted is not None:
        print(f"wrote {plotted}")


if __name__ == "__main__":
    main()
