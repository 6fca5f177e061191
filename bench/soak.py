"""Soak (``make soak`` → bench/results/soak.json and soak.png; not part of ``make test``).

On the local control plane with a real SoftHSM2 token: the operator and the HSM sidecar run
for SOAK_MINUTES (default 15) with SOAK_DATAKEYS (default 1,000) DataKeys while
- the KeyRing is rotated every SOAK_ROTATE_SECONDS (60): every DataKey is re-wrapped each time;
- every SOAK_CHAOS_SECONDS (10) a few DataKey Secrets are deleted and a few edited at random;
- the sidecar is restarted twice and the operator SIGKILLed twice (and started again, as a
  kubelet would), all in the first half of the run.
RSS and open file descriptors of the operator, the sidecar and the sidecar's PKCS#11 worker
are sampled every SOAK_SAMPLE_SECONDS (5).

It fails (exit 1) if, at the end, any DataKey is not Ready, is not on the primary version, has
a DEK different from the one it had at the start (unwrapped through the sidecar) or a DEK
generation other than 1 — or if a process grows without bound. The criterion for that, over
the last half of the run (after every restart, so each process is one process throughout):
the least-squares slope of RSS, extrapolated to one hour, must stay under 25% of the
process's median RSS in that half, and the fd-count slope extrapolated to one hour under 10
descriptors. A leak of a few KiB per rotation or one fd per Secret edit fails it; allocator
noise does not.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import random
import socket
import statistics
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
from kustody.testing.faults import (
    children,
    linear_slope,
    sample_process,
    unwrap_all,
    wait_for,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MINUTES = float(os.environ.get("SOAK_MINUTES", "15"))
N = int(os.environ.get("SOAK_DATAKEYS", "1000"))
ROTATE_S = float(os.environ.get("SOAK_ROTATE_SECONDS", "60"))
CHAOS_S = float(os.environ.get("SOAK_CHAOS_SECONDS", "10"))
SAMPLE_S = float(os.environ.get("SOAK_SAMPLE_SECONDS", "5"))
SEED = int(os.environ.get("SOAK_SEED", "20261202"))
NAME = os.environ.get("SOAK_NAME", "soak")  # bench/results/NAME.json and NAME.png
NS, RING = "soak", "soak"
RSS_GROWTH_PER_HOUR = 0.25  # of the median RSS over the last half
FD_GROWTH_PER_HOUR = 10.0
# Disruptions, as fractions of the run: all in the first half.
SIDECAR_RESTARTS = (0.08, 0.22)
OPERATOR_KILLS = (0.12, 0.30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log(message: str) -> None:
    print(f"{dt.datetime.now(dt.UTC):%H:%M:%S} {message}", flush=True)


def _manifests() -> str:
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}},
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "RotationPolicy",
            "metadata": {"name": RING},
            "spec": {"rotationPeriod": "2160h", "retireAfter": "0s", "destroyAfter": "24h"},
        },
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": RING},
            "spec": {
                "algorithm": "AES256GCM",
                "rotationPolicyRef": {"name": RING},
                "allowedNamespaces": {"names": [NS]},
            },
        },
    ]
    docs += [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": f"dk-{i:04d}", "namespace": NS},
            "spec": {"keyRingRef": {"name": RING}, "secretName": f"dk-{i:04d}"},
        }
        for i in range(N)
    ]
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": docs})


def _items(cluster: Cluster, kind: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", kind, "-n", NS, "-o", "json", timeout=300).stdout
    return list(json.loads(out)["items"])


def _ready(obj: dict[str, Any]) -> bool:
    conditions = (obj.get("status") or {}).get("conditions") or ()
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _primary(cluster: Cluster) -> int:
    out = cluster.kubectl("get", "keyring", RING, "-o", "jsonpath={.status.primaryVersion}")
    return int(out.stdout or 0)


def _rotate(cluster: Cluster) -> None:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    cluster.kubectl(
        "annotate", "keyring", RING, "--overwrite", f"kustody.io/rotate-requested-at={stamp}"
    )


def _chaos(cluster: Cluster, rng: random.Random, counts: dict[str, int]) -> None:
    names = rng.sample(range(N), 6)
    for i in names[:3]:
        result = cluster.kubectl("delete", "secret", f"dk-{i:04d}", "-n", NS, check=False)
        counts["secrets_deleted"] += result.returncode == 0
    for i in names[3:]:
        patch = {"data": {"wrapped-key": "dGFtcGVyZWQ="}, "metadata": {"labels": {"x": "y"}}}
        result = cluster.kubectl(
            "patch", "secret", f"dk-{i:04d}", "-n", NS, "--type=merge", "-p", json.dumps(patch),
            check=False,
        )  # fmt: skip
        counts["secrets_edited"] += result.returncode == 0


def _settled(cluster: Cluster) -> dict[str, Any] | None:
    primary = _primary(cluster)
    dks = _items(cluster, "datakeys")
    secrets = {s["metadata"]["name"] for s in _items(cluster, "secrets")}
    behind = [
        d["metadata"]["name"]
        for d in dks
        if not _ready(d)
        or (d.get("status") or {}).get("keyRingVersion") != primary
        or d["metadata"]["name"] not in secrets
    ]
    return None if behind else {"primary": primary, "datakeys": dks}


def _growth(series: list[dict[str, Any]], start: float, end: float) -> dict[str, Any]:
    half = [s for s in series if s["t"] >= start]
    if len(half) < 3:
        return {"samples": len(half), "ok": False, "why": "too few samples in the last half"}
    rss_slope = linear_slope((s["t"], s["rss_mib"]) for s in half) * 3600  # MiB per hour
    fd_slope = linear_slope((s["t"], s["fds"]) for s in half) * 3600
    median_rss = statistics.median(s["rss_mib"] for s in half)
    rss_ok = rss_slope <= RSS_GROWTH_PER_HOUR * median_rss
    fd_ok = fd_slope <= FD_GROWTH_PER_HOUR
    return {
        "samples": len(half),
        "rss_mib_per_hour": round(rss_slope, 2),
        "rss_limit_mib_per_hour": round(RSS_GROWTH_PER_HOUR * median_rss, 2),
        "fds_per_hour": round(fd_slope, 2),
        "fd_limit_per_hour": FD_GROWTH_PER_HOUR,
        "median_rss_mib": round(median_rss, 1),
        "ok": rss_ok and fd_ok,
    }


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_rss, ax_fd) = plt.subplots(2, 1, figsize=(10, 7), sharex=True)
    for name, series in result["series"].items():
        ts = [s["t"] / 60 for s in series]
        ax_rss.plot(ts, [s["rss_mib"] for s in series], ".-", markersize=2, label=name)
        ax_fd.plot(ts, [s["fds"] for s in series], ".-", markersize=2, label=name)
    for event in result["events"]:
        colour = {"operator SIGKILL": "red", "sidecar restart": "orange"}.get(event["what"])
        if colour:
            for ax in (ax_rss, ax_fd):
                ax.axvline(event["t"] / 60, color=colour, linestyle="--", linewidth=0.8)
    for ax in (ax_rss, ax_fd):
        ax.axvspan(result["last_half_from_s"] / 60, result["duration_s"] / 60, alpha=0.07)
        ax.grid(alpha=0.3)
    ax_rss.set_ylabel("RSS (MiB)")
    ax_fd.set_ylabel("open fds")
    ax_fd.set_xlabel("minutes (red: operator SIGKILL, orange: sidecar restart; shaded: judged)")
    ax_rss.legend(loc="upper left")
    ax_rss.set_title(
        f"Kustody soak: {result['datakeys']} DataKeys, {result['rotations']} rotations, "
        f"{result['chaos']['secrets_deleted']} Secrets deleted, "
        f"{result['chaos']['secrets_edited']} edited"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    rng = random.Random(SEED)
    duration = MINUTES * 60
    with tempfile.TemporaryDirectory(prefix="kustody-soak-") as tmp:
        work = Path(tmp)
        plane = ControlPlane(work / "plane", binaries=build(), log=_log)
        cluster = plane.start()
        token = create_token(work / "softhsm", "soak")
        sidecar = Sidecar(work / "stack", token).start()
        port = _free_port()
        operator = Operator(
            work / "stack", cluster, sidecar.socket, name="soak-op", metrics_port=port
        )
        try:
            crds = REPO / "crds"
            cluster.kubectl("apply", "--server-side", "-f", str(crds))
            cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
            operator.start().wait_active()
            cluster.kubectl("apply", "--server-side", "-f", "-", input=_manifests(), timeout=300)
            wait_for(
                lambda: sum(_ready(d) for d in _items(cluster, "datakeys")) == N,
                600,
                f"all {N} DataKeys Ready",
                every=2,
            )
            before = unwrap_all(sidecar.socket, _items(cluster, "secrets"))
            assert len(before) == N, f"{len(before)} DEKs unwrapped, expected {N}"
            _log(f"{N} DataKeys Ready; soaking for {MINUTES:g} minutes")

            series: dict[str, list[dict[str, Any]]] = {
                "operator": [],
                "sidecar": [],
                "sidecar-worker": [],
            }
            events: list[dict[str, Any]] = []
            counts = {"secrets_deleted": 0, "secrets_edited": 0}
            pending = sorted(
                [(f * duration, "sidecar restart") for f in SIDECAR_RESTARTS]
                + [(f * duration, "operator SIGKILL") for f in OPERATOR_KILLS]
            )
            started = time.monotonic()
            next_sample = next_rotate = next_chaos = 0.0
            rotations = 0
            while (t := time.monotonic() - started) < duration:
                if t >= next_sample:
                    next_sample += SAMPLE_S
                    pids = {"operator": operator.proc.popen, "sidecar": sidecar.proc.popen}
                    for name, popen in pids.items():
                        if popen is None or popen.poll() is not None:
                            continue
                        if (s := sample_process(popen.pid)) is not None:
                            series[name].append(
                                {
                                    "t": round(t, 1),
                                    "rss_mib": round(s.rss_kib / 1024, 2),
                                    "fds": s.fds,
                                }
                            )
                        if name == "sidecar":
                            for child in children(popen.pid):
                                if (c := sample_process(child)) is not None:
                                    series["sidecar-worker"].append(
                                        {
                                            "t": round(t, 1),
                                            "rss_mib": round(c.rss_kib / 1024, 2),
                                            "fds": c.fds,
                                        }
                                    )
                if t >= next_rotate:
                    next_rotate += ROTATE_S
                    _rotate(cluster)
                    rotations += 1
                    events.append({"t": round(t, 1), "what": "rotation"})
                if t >= next_chaos:
                    next_chaos += CHAOS_S
                    _chaos(cluster, rng, counts)
                if pending and t >= pending[0][0]:
                    _, what = pending.pop(0)
                    events.append({"t": round(t, 1), "what": what})
                    _log(what)
                    if what == "sidecar restart":
                        sidecar.stop()
                        sidecar.start()
                    else:
                        operator.kill()
                        operator.start().wait_active(timeout=120)
                time.sleep(0.5)

            _log("soak over; waiting for everything to settle")
            settle_started = time.monotonic()
            settled = wait_for(
                lambda: _settled(cluster), 600, "all DataKeys Ready on the primary", every=3
            )
            settle_s = time.monotonic() - settle_started
            after = unwrap_all(sidecar.socket, _items(cluster, "secrets"))
            changed = sorted(k for k in before if after.get(k) != before[k])
            generations = sorted(
                {
                    int((d.get("status") or {}).get("dekGeneration") or 0)
                    for d in settled["datakeys"]
                }
            )
            ready = sum(_ready(d) for d in settled["datakeys"])
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                metrics = r.read().decode()
            rewraps = sum(
                float(line.rsplit(" ", 1)[1])
                for line in metrics.splitlines()
                if line.startswith("kustody_rewraps_total")
            )
        finally:
            operator.stop()
            sidecar.stop()
            plane.stop()

    last_half = duration / 2
    growth = {name: _growth(s, last_half, duration) for name, s in series.items() if s}
    ends = {
        name: {
            "start": {"rss_mib": s[0]["rss_mib"], "fds": s[0]["fds"]},
            "last_half_start": next(
                ({"rss_mib": x["rss_mib"], "fds": x["fds"]} for x in s if x["t"] >= last_half),
                None,
            ),
            "end": {"rss_mib": s[-1]["rss_mib"], "fds": s[-1]["fds"]},
            "max_rss_mib": max(x["rss_mib"] for x in s),
        }
        for name, s in series.items()
        if s
    }
    failures = []
    if ready != N:
        failures.append(f"{N - ready} DataKeys not Ready")
    if changed:
        failures.append(f"{len(changed)} DEKs changed: {changed[:5]}")
    if len(after) != N:
        failures.append(f"{len(after)} Secrets unwrapped, expected {N}")
    if generations != [1]:
        failures.append(f"DEK generations {generations}, expected only 1")
    failures += [f"{name} grows: {g}" for name, g in growth.items() if not g["ok"]]
    result = {
        "machine": {"cpus": os.cpu_count(), "load_1m_at_end": os.getloadavg()[0]},
        "minutes": MINUTES,
        "duration_s": duration,
        "last_half_from_s": last_half,
        "datakeys": N,
        "rotations": rotations,
        "primary_version_at_end": settled["primary"],
        "rewraps_by_last_operator": rewraps,
        "chaos": counts,
        "sidecar_restarts": len(SIDECAR_RESTARTS),
        "operator_sigkills": len(OPERATOR_KILLS),
        "settle_s": round(settle_s, 1),
        "datakeys_ready": ready,
        "deks_unchanged": N - len(changed) if len(after) == N else len(after) - len(changed),
        "dek_generations": generations,
        "processes": ends,
        "growth_last_half": growth,
        "criterion": (
            f"over the last half: RSS slope x 1 h <= {RSS_GROWTH_PER_HOUR:.0%} of the median "
            f"RSS, fd slope x 1 h <= {FD_GROWTH_PER_HOUR:g}"
        ),
        "failures": failures,
        "events": events,
        "series": series,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    _plot(result, RESULTS / f"{NAME}.png")
    summary = {k: result[k] for k in ("datakeys_ready", "deks_unchanged", "rotations", "chaos")}
    print(json.dumps({**summary, "processes": ends, "growth_last_half": growth}, indent=1))
    if failures:
        print("SOAK FAILED: " + "; ".join(failures), file=sys.stderr)
        return 1
    print("soak passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
