"""KMS v2: Kustody's plugins against a minimal Go plugin on the same token (``make bench-hsm``).

Kustody has two KMS v2 plugins with one envelope and key_id: ``kustody-kms`` (kms/, Go; the
fast path, ``kustody_go`` here) and the sidecar's ``--kms-socket`` (Python, ``kustody``).

The reference is ``bench/gokms`` (its own Go module, built into the cache on first use): a Go
KMS v2 plugin over PKCS#11 (github.com/miekg/pkcs11, Kubernetes' own k8s.io/kms/pkg/service
gRPC server on a unix socket) that seals every Encrypt in the token with AES-256-GCM under a
token key (nonce from the token's RNG, key_id as AAD) and opens every Decrypt in the token: no
caching, no batching, a pool of PKCS#11 sessions (one per concurrent call).

The third is the floor of any Python gRPC plugin (``bench/kms_floor.py``): a grpc.aio KMS v2
server with Kustody's generated code and server options whose handlers do no cryptography.
Its ratio to the Go plugin (``kms_python_floor_ratio_c*``) bounds what a Python front end can
reach, and Kustody's ratio to it (``kustody_of_python_floor``) is what is left for Kustody's
own code (policy, metrics, the PKCS#11 worker round trip, the token) to lose. The fourth is the
same no-crypto server on the synchronous ``grpc.server`` (2 threads): what the other Python
gRPC server would allow (``kms_python_sync_floor_ratio_c*``).

The plugins run side by side on one SoftHSM2 token for the whole run; the same Go client
(``gokms load``: one gRPC connection, as kube-apiserver keeps, 32-byte seeds, a fresh uid per
call, every Decrypt plaintext checked) drives them in turn: for each repetition, concurrency
and operation, one run against each plugin, the order rotating between repetitions, so
drift in the machine's load falls on both. Each figure is the median of the repetitions with
its min-max; the 1-minute load average is recorded before every run.

``kms_ratio_c1`` / ``kms_ratio_c16``: ``kustody-kms``'s median ops/s over the reference Go
plugin's, the lower of Encrypt and Decrypt (target >= 0.8); ``kms_python_ratio_c*`` the same
for the sidecar's Python plugin. Also per operation, and the per-repetition ratios of the
adjacent runs (min-max). ``server_cpu_us_per_op`` is what each plugin's processes used per
operation (the Python plugin: front end + PKCS#11 worker).

``KUSTODY_BENCH_KMS_REPEATS`` (default 3), ``KUSTODY_BENCH_SECONDS`` (default 3 per run).
``python bench/kms.py`` runs this part alone and prints the JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from kustody.dev import kmsplugin
from kustody.dev.tokens import DevToken, create_token

DURATION = float(os.environ.get("KUSTODY_BENCH_SECONDS", "3"))
REPEATS = int(os.environ.get("KUSTODY_BENCH_KMS_REPEATS", "3"))
CONCURRENCIES = tuple(
    int(c) for c in os.environ.get("KUSTODY_BENCH_KMS_CONCURRENCY", "1,16").split(",")
)
OPS = ("encrypt", "decrypt")
WARMUP = "1s"
TARGET = 0.8
KEY_RING = "bench-kms"
GOKMS = Path(__file__).resolve().parent / "gokms"
PLUGINS = ("go", "kustody_go", "kustody", "python_floor", "python_sync_floor")
SYNC_THREADS = 2  # the best of 1, 2, 4 and 16 threads in a side experiment
FLOOR = Path(__file__).resolve().parent / "kms_floor.py"


def build_go(module: Path, name: str) -> Path | None:
    """A Go module's binary, built once per source version into the cache; None without Go."""
    go = shutil.which("go")
    if go is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(module.iterdir()):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kustody" / "bench"
    binary = cache / f"{name}-{digest.hexdigest()[:16]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"building {binary} (once; cached afterwards)", file=sys.stderr)
        partial = binary.with_suffix(".partial")
        subprocess.run([go, "build", "-o", str(partial), "."], cwd=module, check=True)
        partial.rename(binary)
    return binary


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _wait_for(path: Path, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start")
        time.sleep(0.05)


def start_kustody(token: DevToken, directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    socket, kms = directory / "kustody.sock", directory / "kustody-kms.sock"
    env = {**os.environ, **token.env, "KUSTODY_HSM_PIN_FILE": str(token.pin_file)}
    command = [
        sys.executable, "-m", "kustody", "hsm", "--module", str(token.module),
        "--token-label", token.label, "--socket", str(socket), "--log-level", "WARNING",
        "--kms-socket", str(kms), "--kms-keyring", KEY_RING, "--kms-create-if-missing",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    _wait_for(kms, process, "the Kustody sidecar")
    return process, kms


def start_go(
    binary: Path, token: DevToken, directory: Path
) -> tuple[subprocess.Popen[bytes], Path]:
    socket = directory / "gokms.sock"
    command = [
        str(binary), "serve", "--module", str(token.module), "--token-label", token.label,
        "--pin-file", str(token.pin_file), "--socket", str(socket),
    ]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, **token.env})
    _wait_for(socket, process, "the Go KMS plugin")
    return process, socket


def start_kustody_go(token: DevToken, directory: Path) -> kmsplugin.KmsPlugin:
    """``kustody-kms`` on the KeyRing the sidecar created, once its Status says ok."""
    plugin = kmsplugin.KmsPlugin(
        kmsplugin.build(log=lambda line: print(line, file=sys.stderr)),
        token,
        KEY_RING,
        directory / "kustody-go-kms.sock",
        directory / "kustody-go-kms.log",
    ).start()  # as deployed: the default --health-interval (5s) and --sessions (16)
    deadline = time.monotonic() + 30
    while _healthz(plugin.socket) != "ok":
        if time.monotonic() > deadline:
            plugin.stop()
            raise SystemExit(f"kustody-kms is not healthy: {_healthz(plugin.socket)}")
        time.sleep(0.2)
    return plugin


def _healthz(socket: Path) -> str:
    import grpc
    from kustody.api._proto import kms_v2_pb2 as pb
    from kustody.api._proto import kms_v2_pb2_grpc as pb_grpc

    with grpc.insecure_channel(f"unix:{socket}") as channel:
        stub = pb_grpc.KeyManagementServiceStub(channel)  # type: ignore[no-untyped-call]
        return str(stub.Status(pb.StatusRequest(), timeout=5).healthz)


def start_floor(directory: Path, sync: int = 0) -> tuple[subprocess.Popen[bytes], Path]:
    socket = directory / ("sync-floor.sock" if sync else "floor.sock")
    command = [sys.executable, str(FLOOR), str(socket)]
    process = subprocess.Popen([*command, "--sync", str(sync)] if sync else command)
    _wait_for(socket, process, "the Python gRPC floor server")
    return process, socket


def one_run(
    binary: Path, socket: Path, op: str, concurrency: int, pids: list[int]
) -> dict[str, Any]:
    load = [round(x, 2) for x in os.getloadavg()]
    command = [
        str(binary), "load", "-socket", str(socket), "-op", op, "-c", str(concurrency),
        "-duration", f"{DURATION}s", "-warmup", WARMUP,
        "-watch-pids", ",".join(str(p) for p in pids),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=DURATION + 120)
    if done.returncode != 0:
        raise SystemExit(f"the KMS load client failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    if out["failures"]:
        raise SystemExit(f"KMS {op}: {out['failures']} calls failed: {out['first_error']}")
    wall = out["seconds"]
    server = sum(out["watched_cpu_seconds"].values())
    calls = max(1, out["calls"])
    return {
        "ops_s": round(out["ops_s"], 1),
        "p50_ms": out["p50_ms"],
        "p99_ms": out["p99_ms"],
        "server_cpu_cores": round(server / wall, 2),
        "server_cpu_us_per_op": round(server / calls * 1e6, 1),
        "client_cpu_cores": round(out["client_cpu_seconds"] / wall, 2),
        "load_1m_before": load[0],
    }


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def summarise(runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """runs[plugin][f"{op}_c{c}"] -> one entry per repetition (same order for both plugins)."""
    cases: dict[str, Any] = {}
    for plugin, by_case in runs.items():
        for case, reps in by_case.items():
            cases.setdefault(case, {})[plugin] = {
                "ops_s": _spread([r["ops_s"] for r in reps]),
                "p50_ms": _spread([r["p50_ms"] for r in reps]),
                "p99_ms": _spread([r["p99_ms"] for r in reps]),
                "server_cpu_us_per_op": _spread([r["server_cpu_us_per_op"] for r in reps]),
                "server_cpu_cores": _spread([r["server_cpu_cores"] for r in reps]),
                "client_cpu_cores": _spread([r["client_cpu_cores"] for r in reps]),
                "runs": reps,
            }
    result: dict[str, Any] = {"kms_cases": cases}
    for concurrency in CONCURRENCIES:
        ratios: dict[str, float] = {}
        python: dict[str, float] = {}
        floors: dict[str, float] = {}
        syncs: dict[str, float] = {}
        for op in OPS:
            case = cases[f"{op}_c{concurrency}"]
            go, fast, ours = case["go"], case["kustody_go"], case["kustody"]
            for name, plugin, into in (("", fast, ratios), ("python_", ours, python)):
                pairs = [
                    k["ops_s"] / g["ops_s"] for k, g in zip(plugin["runs"], go["runs"], strict=True)
                ]
                ratio = plugin["ops_s"]["median"] / go["ops_s"]["median"]
                case[f"{name}ratio"] = round(ratio, 3)
                case[f"{name}ratio_per_repetition"] = _spread(pairs)
                into[op] = round(ratio, 3)
            floor = case["python_floor"]["ops_s"]["median"]
            case["python_floor_ratio"] = round(floor / go["ops_s"]["median"], 3)
            case["kustody_of_python_floor"] = round(ours["ops_s"]["median"] / floor, 3)
            floors[op] = case["python_floor_ratio"]
            sync = case["python_sync_floor"]["ops_s"]["median"]
            case["python_sync_floor_ratio"] = round(sync / go["ops_s"]["median"], 3)
            syncs[op] = case["python_sync_floor_ratio"]
        result[f"kms_ratio_c{concurrency}"] = min(ratios.values())
        result[f"kms_ratio_c{concurrency}_by_op"] = ratios
        result[f"kms_python_ratio_c{concurrency}"] = min(python.values())
        result[f"kms_python_ratio_c{concurrency}_by_op"] = python
        result[f"kms_python_floor_ratio_c{concurrency}"] = min(floors.values())
        result[f"kms_python_sync_floor_ratio_c{concurrency}"] = min(syncs.values())
    return result


def run() -> dict[str, Any]:
    """Both plugins on one token; the ``kms_*`` results (or ``kms_error`` without Go)."""
    binary = build_go(GOKMS, "gokms")
    if binary is None:
        return {"kms_error": "Go is not on PATH: the reference plugin cannot be built"}
    load_before = [round(x, 2) for x in os.getloadavg()]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {p: {} for p in PLUGINS}
    with tempfile.TemporaryDirectory(prefix="kustody-bench-kms-") as tmp:
        base = Path(tmp)
        token = create_token(base / "token", "bench")
        kustody, kustody_socket = start_kustody(token, base)
        go, go_socket = start_go(binary, token, base)
        fast = start_kustody_go(token, base)
        assert fast.process is not None
        floor, floor_socket = start_floor(base)
        sync_floor, sync_floor_socket = start_floor(base, SYNC_THREADS)
        try:
            pids = {
                "go": [go.pid],
                "kustody_go": [fast.process.pid],
                "kustody": [kustody.pid, *_children(kustody.pid)],  # front end, then worker
                "python_floor": [floor.pid],
                "python_sync_floor": [sync_floor.pid],
            }
            sockets = {
                "go": go_socket,
                "kustody_go": fast.socket,
                "kustody": kustody_socket,
                "python_floor": floor_socket,
                "python_sync_floor": sync_floor_socket,
            }
            for rep in range(REPEATS):
                shift = rep % len(PLUGINS)  # each plugin goes first, second, third in turn
                order = PLUGINS[shift:] + PLUGINS[:shift]
                for concurrency in CONCURRENCIES:
                    for op in OPS:
                        for plugin in order:
                            if plugin == "kustody":  # the worker may have been restarted
                                pids[plugin] = [kustody.pid, *_children(kustody.pid)]
                            out = one_run(binary, sockets[plugin], op, concurrency, pids[plugin])
                            out["repetition"] = rep
                            runs[plugin].setdefault(f"{op}_c{concurrency}", []).append(out)
                            print(
                                f"kms {plugin:17} {op:8} c{concurrency:<3} rep {rep}: "
                                f"{out['ops_s']:8,.0f}/s p99 {out['p99_ms']:6.2f} ms "
                                f"{out['server_cpu_us_per_op']:6.0f} us/op "
                                f"(load {out['load_1m_before']})",
                                file=sys.stderr,
                            )
        finally:
            fast.stop()
            for process in (sync_floor, floor, go, kustody):
                process.terminate()
                process.wait(timeout=10)
    result = summarise(runs)
    loads = [r["load_1m_before"] for p in runs.values() for reps in p.values() for r in reps]
    result["kms_method"] = {
        "repeats": REPEATS,
        "seconds_per_run": DURATION,
        "warmup": WARMUP,
        "concurrency": list(CONCURRENCIES),
        "connections": 1,
        "plaintext_bytes": 32,
        "token": "softhsm2",
        "reference": "bench/gokms (github.com/miekg/pkcs11 v1.1.2, k8s.io/kms v0.36.3)",
        "kustody_go": "kms/ (kustody-kms with its defaults: --sessions 16, --health-interval 5s)",
        "target_ratio": TARGET,
        "load_avg": {
            "before": load_before,
            "after": [round(x, 2) for x in os.getloadavg()],
            "load_1m_before_runs": _spread(loads),
        },
    }
    return result


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
    sys.exit(0)
