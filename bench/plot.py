"""PNG plots of the benchmark results, written beside the JSON in bench/results.

* ``hsm-kms.png``: KMS v2 Encrypt/Decrypt ops/s of Kustody's two plugins (``kustody-kms`` in
  Go, the sidecar's in Python), the Go reference plugin and the Python gRPC floors at each
  concurrency (median bars, min-max whiskers), with each Kustody plugin's ratio to the
  reference and the 0.8 target (from ``kms_cases`` in hsm.json);
* ``hsm-unwrap.png``: workload unwrap ops/s and p99 latency against concurrency (medians,
  min-max bands), one line per front-end configuration (from ``unwrap_sweep`` in hsm.json);
* ``operator.png``: time to Ready (create) and to re-wrapped (rotate) against the number of
  DataKeys (from operator.json).

``python bench/plot.py`` redraws all three from the committed JSON; the benchmarks call the
functions after writing their results. Each function returns the PNG's path, or None when the
results hold nothing to draw.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

RESULTS = Path(__file__).resolve().parent / "results"
COLOURS = {
    "go": "#4c72b0",
    "kustody_go": "#55a868",
    "kustody": "#dd8452",
    "python_floor": "#8c8c8c",
    "python_sync_floor": "#c7c7c7",
}
LABELS = {
    "go": "reference Go plugin (bench/gokms)",
    "kustody_go": "Kustody: kustody-kms (Go)",
    "kustody": "Kustody: sidecar --kms-socket (Python)",
    "python_floor": "Python grpc.aio floor (no crypto)",
    "python_sync_floor": "Python grpc sync floor, 2 threads (no crypto)",
}


def _mid(value: Any) -> float:
    """A figure that is either a number or a {median, min, max} spread."""
    return float(value["median"] if isinstance(value, dict) else value)


def _range(value: Any) -> tuple[float, float]:
    if isinstance(value, dict):
        return float(value["min"]), float(value["max"])
    return float(value), float(value)


def _load_note(load: dict[str, Any] | None) -> str:
    if not load:
        return ""
    spread = load.get("load_1m_before_runs")
    if spread:
        return (
            f"1-min load before runs: median {spread['median']:.1f} "
            f"({spread['min']:.1f}-{spread['max']:.1f})"
        )
    return f"load before {load.get('before')}, after {load.get('after')}"


def plot_kms(result: dict[str, Any], out: Path = RESULTS / "hsm-kms.png") -> Path | None:
    cases = result.get("kms_cases")
    if not cases:
        return None
    method = result.get("kms_method", {})
    names = sorted(cases, key=lambda c: (int(c.split("_c")[1]), c))
    plugins = [p for p in COLOURS if p in cases[names[0]]]
    fig, ax = plt.subplots(figsize=(9, 4.8))
    width = 0.8 / len(plugins)
    for j, plugin in enumerate(plugins):
        xs = [i + (j - (len(plugins) - 1) / 2) * width for i in range(len(names))]
        mids = [_mid(cases[n][plugin]["ops_s"]) for n in names]
        lows, highs = zip(*(_range(cases[n][plugin]["ops_s"]) for n in names), strict=True)
        err = [[m - lo for m, lo in zip(mids, lows, strict=True)],
               [hi - m for m, hi in zip(mids, highs, strict=True)]]  # fmt: skip
        ax.bar(xs, mids, width, yerr=err, capsize=3, color=COLOURS[plugin], label=LABELS[plugin])
        ratio_key = {"kustody_go": "ratio", "kustody": "python_ratio"}.get(plugin)
        if ratio_key and "kustody_go" not in cases[names[0]]:
            ratio_key = "ratio" if plugin == "kustody" else None  # results from before kms/
        if ratio_key:
            for x, n, m in zip(xs, names, mids, strict=True):
                ax.annotate(
                    f"{cases[n].get(ratio_key, 0):.2f}x",
                    (x, m),
                    textcoords="offset points",
                    xytext=(0, 4),
                    ha="center",
                    fontsize=8,
                )
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("_c", "\nc=") for n in names])
    ax.set_ylabel("ops/s (median, min-max whiskers)")
    ratios = ", ".join(
        f"c={c}: {result[f'kms_ratio_c{c}']:.2f}x"
        for c in method.get("concurrency", [])
        if f"kms_ratio_c{c}" in result
    )
    ax.set_title(
        f"KMS v2 on one SoftHSM2 token, same Go client: kustody-kms / reference = {ratios} "
        f"(target {method.get('target_ratio', 0.8)})",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    seconds = method.get("seconds_per_run")
    note = f"{method.get('repeats', '?')} interleaved repetitions of {seconds} s"
    fig.text(0.01, 0.01, f"{note}; {_load_note(method.get('load_avg'))}", fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_unwrap(result: dict[str, Any], out: Path = RESULTS / "hsm-unwrap.png") -> Path | None:
    sweep = result.get("unwrap_sweep")
    if not sweep:
        return None
    fig, (ops_ax, p99_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    for config, series in sweep["configs"].items():
        points = sorted(series.items(), key=lambda kv: int(kv[0].lstrip("c")))
        cs = [int(k.lstrip("c")) for k, _ in points]
        for ax, key in ((ops_ax, "ops_s"), (p99_ax, "p99_ms")):
            mids = [_mid(v[key]) for _, v in points]
            lows, highs = zip(*(_range(v[key]) for _, v in points), strict=True)
            (line,) = ax.plot(cs, mids, marker="o", label=config)
            ax.fill_between(cs, lows, highs, alpha=0.2, color=line.get_color())
    ticks = sorted({int(k.lstrip("c")) for series in sweep["configs"].values() for k in series})
    for ax, label in ((ops_ax, "unwrap ops/s"), (p99_ax, "p99 latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.set_xlabel("concurrent callers (Go load generator, TLS)")
        ax.set_ylabel(f"{label} (median, min-max band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    p99_ax.axhline(10, color="red", linestyle=":", linewidth=1)
    fig.suptitle("Workload unwrap against concurrency", fontsize=10)
    note = f"{sweep.get('repeats', '?')} interleaved repetitions of {sweep.get('seconds')} s"
    fig.text(0.01, 0.01, f"{note}; {_load_note(sweep.get('load_avg'))}", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 0.96))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_operator(path: Path = RESULTS / "operator.json") -> Path | None:
    """Time to Ready (create) and to re-wrapped (rotate) against N, from operator.json."""
    data = json.loads(path.read_text())
    rows = sorted(data.get("sizes", []), key=lambda r: r["n"])
    if not rows:
        return None
    out = path.with_suffix(".png")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [r["n"] for r in rows]
    for key, label in (("create_s", "create: all Ready"), ("rotate_s", "rotate: all re-wrapped")):
        present = [(r["n"], r[key]) for r in rows if key in r]
        if not present:
            continue
        xs = [n for n, _ in present]
        mids = [_mid(v) for _, v in present]
        lows, highs = zip(*(_range(v) for _, v in present), strict=True)
        (line,) = ax.plot(xs, mids, marker="o", label=label)
        ax.fill_between(xs, lows, highs, alpha=0.2, color=line.get_color())
        for x, m in zip(xs, mids, strict=True):
            ax.annotate(f"{m:.1f}", (x, m), textcoords="offset points", xytext=(4, 4), fontsize=8)
    target = data.get("targets", {}).get("seconds_at_10000") or 60.0
    ax.axhline(
        target, color="red", linestyle=":", linewidth=1, label=f"target {target:.0f} s (N=10,000)"
    )
    ax.set_xscale("log")
    ax.set_xticks(ns)
    ax.set_xticklabels([f"{n:,}" for n in ns])
    ax.set_xlabel("DataKeys (N)")
    ax.set_ylabel("seconds")
    ax.set_title("Operator: time to Ready and to rotate against N", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    note = f"{data.get('machine', {}).get('cpus', '?')} cores"
    if "repetitions" in data:
        note += f"; median of {data['repetitions']} interleaved repetitions, min-max band"
    if "load_1m_after_each" in data:
        note += f"; 1-min load after each: {data['load_1m_after_each']}"
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main() -> int:
    hsm = RESULTS / "hsm.json"
    written = []
    if hsm.exists():
        result = json.loads(hsm.read_text())
        written += [plot_kms(result), plot_unwrap(result)]
    if (RESULTS / "operator.json").exists():
        written.append(plot_operator())
    for path in written:
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
