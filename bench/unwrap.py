"""Workload unwrap benchmark, called by bench/hsm.py (``make bench-hsm``).

A real kube-apiserver (the local control plane) for TokenReview and the DataKey lookup, the
real `kustody hsm` process with the workload service on TLS, a real projected-style token
from the TokenRequest API. The cache holds the TokenReview and the DataKey after the warm-up,
so this measures the steady state of a pod unwrapping repeatedly: p50/p99/ops at
concurrency 16.

The client shares the 2 cores with the sidecar, so it has to be lean or it measures itself:
a Python grpc.aio client over TLS costs about as much CPU per call as the server. The
headline numbers (``unwrap_*``) therefore come from a small Go load generator
(``bench/unwrapload``, its own Go module, built into the cache on first use; it sends the
pre-serialised request, checks every plaintext). The Python client (pre-built request, raw
stubs) is run too and reported under ``unwrap_python_client``, with what each client and the
sidecar's two processes used of the CPU. Without Go, only the Python client runs.

**Under abuse** (``unwrap_flood``): the same Go callers for ``FLOOD_TOKENS / FLOOD_RATE``
seconds (5,000 distinct forged tokens at 1,000/s, from the same load generator on its own
connection, to 127.0.0.1 only) — the legitimate callers' p99 is reported as
``unwrap_p99_under_flood_ms`` beside ``unwrap_p99_ms``, with what the flood got back and how
many TokenReviews it cost the API server. Twice: with the default review limits (the flood
comes from one address, as one compromised pod's would) and with the per-address limit
lifted (a flood from many addresses: only the global rate and the in-flight bound hold).

``KUSTODY_BENCH_UNWRAP_CLIENT`` = ``go``, ``python`` or ``both`` (default);
``KUSTODY_BENCH_PYSPY=DIR`` records a py-spy profile (collapsed stacks) of the sidecar's front
end during each load into DIR.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import hashlib
import ipaddress
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client as k8s
from kustody.api.client import HsmClient
from kustody.client._proto import unwrap_pb2 as pb
from kustody.dev import binaries
from kustody.dev.controlplane import ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Sidecar
from kustody.domain.aad import Binding
from kustody.sidecar.unwrap.frontends import usable_cores

CONCURRENCY = 16
# The Go callers at each of these, REPEATS times (interleaved): ops/s and p99 against concurrency.
_SWEEP = os.environ.get("KUSTODY_BENCH_UNWRAP_SWEEP", "1,4,16,64")
SWEEP = tuple(sorted({CONCURRENCY, *(int(c) for c in _SWEEP.split(","))}))
REPEATS = int(os.environ.get("KUSTODY_BENCH_REPEATS", "3"))
# The callers share these; enough that SO_REUSEPORT spreads them evenly over several front ends.
CONNECTIONS = int(os.environ.get("KUSTODY_BENCH_UNWRAP_CONNS", "16"))
# The sidecar's default (--workload-front-ends: the usable cores) against one front end.
FRONT_ENDS = int(os.environ.get("KUSTODY_BENCH_UNWRAP_FRONT_ENDS", "0")) or usable_cores()
DURATION = float(os.environ.get("KUSTODY_BENCH_SECONDS", "3"))
REPO = Path(__file__).resolve().parents[1]
NS, SA, DK, RING = "bench", "app", "orders", "bench-unwrap"
LOADGEN = Path(__file__).resolve().parent / "unwrapload"
# Both clients turn off HTTP/2 BDP probing (the Go one by fixing its windows): at thousands of
# calls/s its PINGs, each answered by the sidecar, are load no real workload would add.
_NO_BDP = [("grpc.http2.bdp_probe", 0)]
WARMUP = os.environ.get("KUSTODY_BENCH_UNWRAP_WARMUP", "1s")
CLIENT = os.environ.get("KUSTODY_BENCH_UNWRAP_CLIENT", "both")
PYSPY_DIR = os.environ.get("KUSTODY_BENCH_PYSPY")
FLOOD_TOKENS = int(os.environ.get("KUSTODY_BENCH_FLOOD_TOKENS", "5000"))
# Issue 11: a 3-generation keyset in one unwrap call vs the single key, interleaved.
KEYSET_REPEATS = int(os.environ.get("KUSTODY_BENCH_KEYSET_REPEATS", "3"))
FLOOD_RATE = float(os.environ.get("KUSTODY_BENCH_FLOOD_RATE", "1000"))
# The per-address limit lifted: the flood as if from many addresses.
_MANY_ADDRESSES = (
    "--workload-peer-review-rate",
    "1000000",
    "--workload-peer-review-burst",
    "1000000",
)
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def build_loadgen() -> Path | None:
    """The Go load generator, built once per source version into the cache; None without Go."""
    go = shutil.which("go")
    if go is None:
        return None
    digest = hashlib.sha256()
    for path in sorted(LOADGEN.iterdir()):
        if path.suffix in (".go", ".mod", ".sum"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kustody" / "bench"
    binary = cache / f"unwrapload-{digest.hexdigest()[:16]}"
    if not binary.exists():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"building {binary} (once; cached afterwards)", file=sys.stderr)
        subprocess.run([go, "build", "-o", str(binary), "."], cwd=LOADGEN, check=True)
    return binary


@contextlib.contextmanager
def profiled(pid: int, name: str) -> Iterator[None]:
    """py-spy (collapsed stacks) on ``pid`` while the block runs, when KUSTODY_BENCH_PYSPY."""
    if not PYSPY_DIR:
        yield
        return
    out = Path(PYSPY_DIR) / f"{name}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    pyspy = Path(sys.executable).parent / "py-spy"
    rate = os.environ.get("KUSTODY_BENCH_PYSPY_RATE", "200")
    command = [str(pyspy), "record", "--pid", str(pid), "--format", "raw", "--rate", rate,
               "--nonblocking", "--output", str(out)]  # fmt: skip
    if os.environ.get("KUSTODY_BENCH_PYSPY_GIL"):
        command.append("--gil")  # only the thread that holds the GIL
    if os.environ.get("KUSTODY_BENCH_PYSPY_NATIVE"):
        command[command.index("--nonblocking")] = "--native"  # (needs to pause the process)
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield
    finally:
        process.send_signal(2)  # SIGINT: py-spy writes its output and exits
        process.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _tls(directory: Path) -> tuple[Path, Path, Path]:
    now = dt.datetime.now(dt.UTC)

    def cert(cn: str, key: Any, issuer: x509.Name | None, signer: Any) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(issuer or name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), True)
        )
        if issuer is not None:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), False)
        return builder.sign(signer, hashes.SHA256())

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = cert("bench-ca", ca_key, None, ca_key)
    leaf = cert("bench-unwrap", key, ca.subject, ca_key)
    pem = serialization.Encoding.PEM
    paths = (directory / "ca.crt", directory / "tls.crt", directory / "tls.key")
    paths[0].write_bytes(ca.public_bytes(pem))
    paths[1].write_bytes(leaf.public_bytes(pem))
    paths[2].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


async def _load(
    stubs: list[Any], request: pb.UnwrapRequest, metadata: Any
) -> tuple[float, list[float], int]:
    latencies: list[float] = []
    failures = 0
    stop = time.perf_counter() + DURATION

    async def worker(w: int) -> None:
        nonlocal failures
        call = stubs[w % len(stubs)]
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                await call(request, metadata=metadata, timeout=5)
            except grpc.RpcError:
                failures += 1
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(CONCURRENCY)))
    return len(latencies) / (time.perf_counter() - start), latencies, failures


async def _python_bench(
    endpoint: str, ca: bytes, request: pb.UnwrapRequest, token: str, pids: list[int]
) -> dict[str, Any]:
    channels = [
        grpc.aio.secure_channel(
            endpoint,
            grpc.ssl_channel_credentials(ca),
            options=[*_NO_BDP, ("grpc.use_local_subchannel_pool", 1)],  # a connection each
        )
        for _ in range(CONNECTIONS)
    ]
    stubs = [
        c.unary_unary(
            "/kustody.workload.v1.Unwrap/Unwrap",
            request_serializer=pb.UnwrapRequest.SerializeToString,
            response_deserializer=pb.UnwrapResponse.FromString,
        )
        for c in channels
    ]
    metadata = (("authorization", f"Bearer {token}"),)
    for stub in stubs:  # warm-up: TLS handshakes, TokenReview and DataKey cached
        await stub(request, metadata=metadata, timeout=10)
    load_1m = round(os.getloadavg()[0], 2)
    cpu0, server0, wall0 = time.process_time(), [_cpu_seconds(p) for p in pids], time.time()
    with profiled(pids[0], "unwrap-frontend-python-client"):
        rate, latencies, failures = await _load(stubs, request, metadata)
    wall = time.time() - wall0
    client_cpu = time.process_time() - cpu0
    server = [_cpu_seconds(p) - s for p, s in zip(pids, server0, strict=True)]
    for c in channels:
        await c.close()
    ordered = sorted(latencies)
    return {
        "p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "ops_s": round(rate, 1),
        "failures": failures,
        "client_cpu_cores": round(client_cpu / wall, 2),
        **_sidecar_cpu(server, wall),
        "load_1m_before": load_1m,
    }


def _roles(first: int) -> list[int]:
    """The sidecar's processes: the first front end, the extra ones, then the PKCS#11 worker."""
    children = _children(first)
    worker = [c for c in children if b"kustody.pkcs11.worker" in _cmdline(c)]
    return [first, *(c for c in children if c not in worker), *worker]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _sidecar_cpu(seconds: list[float], wall: float) -> dict[str, Any]:
    """``seconds`` in the order of :func:`_roles`: front ends, then the worker."""
    return {
        "sidecar_front_end_cpu_cores": round(sum(seconds[:-1]) / wall, 2),
        "sidecar_worker_cpu_cores": round(seconds[-1] / wall, 2),
    }


def _go_bench(
    binary: Path, endpoint: str, ca: Path, request: pb.UnwrapRequest, token: str,
    plaintext: bytes, pids: list[int], directory: Path,
    duration: float = DURATION, flood: list[str] | None = None, concurrency: int = CONCURRENCY,
) -> dict[str, Any]:  # fmt: skip
    files = {"request": request.SerializeToString(), "token": token.encode(), "expect": plaintext}
    if flood is not None:
        files["flood"] = "\n".join(flood).encode()
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    command = [
        str(binary), "-addr", endpoint, "-ca", str(ca), "-server-name", "localhost",
        "-c", str(concurrency), "-conns", str(CONNECTIONS),
        "-duration", f"{duration}s", "-warmup", WARMUP,
        "-watch-pids", ",".join(str(p) for p in pids),
        "-flood-rate", str(FLOOD_RATE),
        *(a for name in files for a in (f"-{name}", str(directory / name))),
    ]  # fmt: skip
    load_1m = round(os.getloadavg()[0], 2)
    with profiled(pids[0], "unwrap-frontend-go-client" + ("-flood" if flood else "")):
        done = subprocess.run(command, capture_output=True, text=True, timeout=duration + 90)
    if done.returncode != 0:
        raise SystemExit(f"the unwrap load generator failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    wall = out["seconds"]
    server = [out["watched_cpu_seconds"].get(str(p), 0.0) for p in pids]
    if out["failures"]:
        print(f"unwrap: {out['failures']} calls failed: {out['first_error']}", file=sys.stderr)
    return {
        "p50_ms": out["p50_ms"],
        "p90_ms": out["p90_ms"],
        "p99_ms": out["p99_ms"],
        "p999_ms": out["p999_ms"],
        "max_ms": out["max_ms"],
        "histogram_ms": out["histogram_ms"],
        "ops_s": round(out["ops_s"], 1),
        "failures": out["failures"],
        "client_cpu_cores": round(out["client_cpu_seconds"] / wall, 2),
        **_sidecar_cpu(server, wall),
        "load_1m_before": load_1m,
        **({"flood": out["flood"]} if out.get("flood") else {}),
    }


def forged_tokens(genuine: str, count: int) -> list[str]:
    """Distinct JWTs that pass every unverified check (a genuine token's header and claims,
    audience kustody, not expired; a fresh ``jti``) with a random signature: each one costs a
    TokenReview unless the front door refuses it first."""
    head, payload, _ = genuine.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    out = []
    for i in range(count):
        claims["jti"] = f"forged-{i}-{os.urandom(4).hex()}"
        out.append(f"{head}.{b64(json.dumps(claims).encode())}.{b64(os.urandom(256))}")
    return out


def _reviews(metrics_port: int) -> dict[str, float]:
    """The sidecar's kustody_unwrap_token_reviews_total by result."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("kustody_unwrap_token_reviews_total{"):
            result = line.split('result="', 1)[1].split('"', 1)[0]
            out[result] = float(line.rsplit(" ", 1)[1])
    return out


def _flood_case(
    loadgen: Path, sidecar: Sidecar, ca: Path, request: pb.UnwrapRequest, token: str,
    plaintext: bytes, directory: Path,
) -> dict[str, Any]:  # fmt: skip
    """The Go callers while FLOOD_TOKENS forged tokens arrive at FLOOD_RATE per second."""
    front_end = sidecar.proc.pid()
    assert front_end is not None
    assert sidecar.metrics_port is not None
    pids = _roles(front_end)
    before = _reviews(sidecar.metrics_port)
    case = _go_bench(
        loadgen, sidecar.workload_listen or "", ca, request, token, plaintext, pids, directory,
        duration=FLOOD_TOKENS / FLOOD_RATE, flood=forged_tokens(token, FLOOD_TOKENS),
    )  # fmt: skip
    after = _reviews(sidecar.metrics_port)
    case["token_reviews"] = {k: round(v - before.get(k, 0.0)) for k, v in after.items()}
    return case


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), 3),
        "min": round(min(values), 3),
        "max": round(max(values), 3),
    }


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min-max of each figure over the repetitions, and the runs themselves."""
    keys = ("ops_s", "p50_ms", "p99_ms", "client_cpu_cores", "sidecar_front_end_cpu_cores",
            "sidecar_worker_cpu_cores")  # fmt: skip
    out: dict[str, Any] = {k: _spread([r[k] for r in runs]) for k in keys if k in runs[0]}
    out["failures"] = sum(r["failures"] for r in runs)
    out["runs"] = [{k: v for k, v in r.items() if k != "histogram_ms"} for r in runs]
    return out


def _headline(summary: dict[str, Any], client: str) -> dict[str, Any]:
    """The ``unwrap_*`` figures at CONCURRENCY: medians of the repetitions, with min-max."""
    median_run = sorted(summary["runs"], key=lambda r: r["p99_ms"])[len(summary["runs"]) // 2]
    return {
        "unwrap_p50_ms": summary["p50_ms"]["median"],
        "unwrap_p99_ms": summary["p99_ms"]["median"],
        "unwrap_ops_s": summary["ops_s"]["median"],
        "unwrap_p99_ms_range": [summary["p99_ms"]["min"], summary["p99_ms"]["max"]],
        "unwrap_ops_s_range": [summary["ops_s"]["min"], summary["ops_s"]["max"]],
        "unwrap_failures": summary["failures"],
        "unwrap_client": client,
        "unwrap_repeats": len(summary["runs"]),
        "unwrap_tail_ms": {  # of the run with the median p99
            k: median_run[k] for k in ("p90_ms", "p999_ms", "max_ms") if k in median_run
        },
        "unwrap_cpu_cores": {
            k: v["median"] for k, v in summary.items() if k.endswith("_cpu_cores")
        },
    }


@dataclasses.dataclass(frozen=True)
class Config:
    """One sidecar under test: its workload endpoint and its processes (:func:`_roles`)."""

    label: str
    endpoint: str
    pids: list[int]


def _sweep(
    loadgen: Path | None, configs: list[Config], ca: Path, request: pb.UnwrapRequest,
    token: str, plaintext: bytes, directory: Path,
) -> dict[str, Any]:  # fmt: skip
    """REPEATS repetitions of: for each configuration (the order alternating), the Go callers
    at each SWEEP concurrency (the order rotating between repetitions); then the Python client
    at CONCURRENCY against the first configuration (the sidecar's default). The headline
    ``unwrap_*`` figures are the Go client's at CONCURRENCY against the first configuration
    (the Python client's without Go); ``unwrap_front_ends_ratio_c{N}`` compare it with the
    second at each concurrency (medians over the repetitions, and each repetition's ratio)."""
    go: dict[str, dict[int, list[dict[str, Any]]]] = {c.label: {} for c in configs}
    python: list[dict[str, Any]] = []
    for rep in range(REPEATS):
        if loadgen is not None:
            shift = rep % len(SWEEP)
            order = configs if rep % 2 == 0 else configs[::-1]
            for config in order:
                for c in SWEEP[shift:] + SWEEP[:shift]:
                    where = directory / f"{config.label}-c{c}-{rep}".replace(" ", "-")
                    go[config.label].setdefault(c, []).append(
                        _go_bench(loadgen, config.endpoint, ca, request, token, plaintext,
                                  config.pids, where, concurrency=c)
                    )  # fmt: skip
        if CLIENT in ("python", "both") or loadgen is None:
            first = configs[0]
            python.append(
                asyncio.run(
                    _python_bench(first.endpoint, ca.read_bytes(), request, token, first.pids)
                )
            )
    result: dict[str, Any] = {}
    loads = [r["load_1m_before"] for by_c in go.values() for runs in (*by_c.values(), python)
             for r in runs]  # fmt: skip
    if loadgen is not None:
        series = {
            label: {f"c{c}": _summary(runs) for c, runs in sorted(by_c.items())}
            for label, by_c in go.items()
        }
        result["unwrap_sweep"] = {
            "client": "go",
            "repeats": REPEATS,
            "seconds": DURATION,
            "connections": CONNECTIONS,
            "configs": series,
            "load_avg": {"load_1m_before_runs": _spread(loads)},
        }
        result.update(_headline(series[configs[0].label][f"c{CONCURRENCY}"], "go"))
        result["unwrap_front_ends"] = configs[0].label
        if len(configs) > 1:
            result.update(_ratios(go[configs[0].label], go[configs[1].label]))
    if python:
        summary = _summary(python)
        if loadgen is not None:
            result["unwrap_python_client"] = summary
        else:
            result.update(_headline(summary, "python"))
    return result


def _ratios(
    many: dict[int, list[dict[str, Any]]], one: dict[int, list[dict[str, Any]]]
) -> dict[str, Any]:
    """ops/s of several front ends over one, per concurrency: the ratio of the medians, and
    each repetition's own ratio (the two ran back to back)."""
    out: dict[str, Any] = {}
    for c in sorted(many):
        ratio = statistics.median(r["ops_s"] for r in many[c]) / statistics.median(
            r["ops_s"] for r in one[c]
        )
        out[f"unwrap_front_ends_ratio_c{c}"] = round(ratio, 2)
        out[f"unwrap_front_ends_ratio_c{c}_runs"] = [
            round(m["ops_s"] / o["ops_s"], 2) for m, o in zip(many[c], one[c], strict=True)
        ]
    return out


def _config(sidecar: Sidecar, front_ends: int) -> Config:
    first = sidecar.proc.pid()
    if first is None:
        raise SystemExit("the sidecar is not running")
    label = "1 front end" if front_ends == 1 else f"{front_ends} front ends"
    return Config(label, sidecar.workload_listen or "", _roles(first))


def _wait_front_ends(sidecar: Sidecar, count: int, timeout: float = 60.0) -> None:
    """Until the sidecar's /metrics says all its front ends serve."""
    if count <= 1:
        return
    deadline = time.monotonic() + timeout
    url = f"http://127.0.0.1:{sidecar.metrics_port}/metrics"
    while time.monotonic() < deadline:
        with urllib.request.urlopen(url, timeout=5) as response:
            if f"kustody_unwrap_front_ends {float(count)}" in response.read().decode():
                return
        time.sleep(0.2)
    raise SystemExit(f"the sidecar's {count} front ends did not all start")


async def plaintext_of(sidecar: Sidecar, wrapped: str, binding: Binding) -> bytes:
    """The expected plaintext, through the operator socket (the load generator checks it)."""
    async with HsmClient.unix(sidecar.socket) as hsm:
        return await hsm.decrypt(wrapped, binding, allow_plaintext_export=True)


def _keyset_case(
    loadgen: Path, endpoint: str, ca: Path, request: pb.UnwrapRequest, older: list[str],
    token: str, sidecar: Sidecar, binding: Binding, pids: list[int], directory: Path,
) -> dict[str, Any]:  # fmt: skip
    """The same call with the whole keyset (the primary plus two earlier generations, as a
    DataKey has after two regenerations), alternated with the single-key call: p99 of each
    as the median over the repetitions, and their ratio (target <= 1.2)."""
    keyset = pb.UnwrapRequest()
    keyset.CopyFrom(request)
    for number, wrapped in enumerate([*older, request.wrapped], start=1):
        keyset.generations.add(
            key_id=number, generation=number, primary=number == len(older) + 1, wrapped=wrapped
        )
    plaintext = asyncio.run(plaintext_of(sidecar, request.wrapped, binding))
    single: list[float] = []
    whole: list[float] = []
    for i in range(KEYSET_REPEATS):
        for name, req, into in (("single", request, single), ("keyset", keyset, whole)):
            run = _go_bench(loadgen, endpoint, ca, req, token, plaintext, pids,
                            directory / f"{name}-{i}")  # fmt: skip
            into.append(run["p99_ms"])
    median_single, median_keyset = statistics.median(single), statistics.median(whole)
    return {
        "unwrap_keyset3_p99_ms": median_keyset,
        "unwrap_keyset3_single_p99_ms": median_single,
        "unwrap_keyset3_p99_ratio": round(median_keyset / median_single, 3),
        "unwrap_keyset3": {
            "generations": len(older) + 1,
            "repeats": KEYSET_REPEATS,
            "single_p99_ms": single,
            "keyset_p99_ms": whole,
            "target_ratio": 1.2,
        },
    }


def run() -> dict[str, Any]:
    """Start a control plane, a token and the sidecar; return the ``unwrap_*`` results."""
    with tempfile.TemporaryDirectory(prefix="kustody-bench-unwrap-") as tmp:
        base = Path(tmp)
        plane = ControlPlane(base / "cp", binaries=binaries.build(), log=lambda _: None)
        cluster = plane.start()
        sidecar: Sidecar | None = None
        single: Sidecar | None = None
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(REPO / "crds"))
            cluster.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", "crd/datakeys.kustody.io"
            )
            cluster.kubectl("create", "namespace", NS)
            cluster.kubectl("create", "serviceaccount", SA, "-n", NS)
            datakey = {
                "apiVersion": "kustody.io/v1alpha1",
                "kind": "DataKey",
                "metadata": {"name": DK, "namespace": NS},
                "spec": {"keyRingRef": {"name": RING}, "secretName": "x", "consumers": [SA]},
            }
            keyring = {  # the unwrap service checks that it (still) allows the namespace
                "apiVersion": "kustody.io/v1alpha1",
                "kind": "KeyRing",
                "metadata": {"name": RING},
                "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [NS]}},
            }
            cluster.kubectl(
                "wait", "--for=condition=Established", "--timeout=60s", "crd/keyrings.kustody.io"
            )
            cluster.kubectl("apply", "-f", "-", input=json.dumps(keyring))
            cluster.kubectl("apply", "-f", "-", input=json.dumps(datakey))
            ca, cert, key = _tls(base)
            token = create_token(base / "token", "bench")

            def start(name: str, front_ends: int, *extra: str) -> Sidecar:
                return Sidecar(
                    base / name,
                    token,
                    name=name,
                    workload_listen=f"127.0.0.1:{_free_port()}",
                    workload_tls_cert=cert,
                    workload_tls_key=key,
                    kubeconfig=cluster.kubeconfig,
                    metrics_port=_free_port(),
                    extra_args=("--log-level", "WARNING", "--workload-rate", "1000000",
                                "--workload-burst", "1000000",
                                "--workload-front-ends", str(front_ends), *extra),
                ).start()  # fmt: skip

            sidecar = main = start("hsm", FRONT_ENDS)
            binding = Binding(NS, DK, {"app": "bench"})

            async def wrap() -> list[str]:
                async with HsmClient.unix(main.socket) as hsm:
                    await hsm.create_key_version(RING, 1)
                    return [(await hsm.generate_data_key(RING, binding)).wrapped for _ in range(3)]

            *older, wrapped = asyncio.run(wrap())
            # The same token, one front end: started after the KEK exists, so its worker
            # finds it (both only read the token from here on).
            if FRONT_ENDS > 1:
                single = start("hsm-one", 1)
            spec = k8s.V1TokenRequestSpec(audiences=["kustody"], expiration_seconds=3600)
            sa_token: str = (
                k8s.CoreV1Api(cluster.api_client())
                .create_namespaced_service_account_token(
                    SA, NS, k8s.AuthenticationV1TokenRequest(spec=spec)
                )
                .status.token
            )
            request = pb.UnwrapRequest(
                wrapped=wrapped,
                key_ring=RING,
                namespace=NS,
                data_key=DK,
                encryption_context=dict(binding.context),
            )
            _wait_front_ends(main, FRONT_ENDS)
            configs = [_config(main, FRONT_ENDS)]
            if single is not None:
                configs.append(_config(single, 1))
            endpoint, pids = configs[0].endpoint, configs[0].pids
            loadgen = build_loadgen() if CLIENT in ("go", "both") else None
            result: dict[str, Any] = {"unwrap_concurrency": CONCURRENCY}
            plaintext = asyncio.run(plaintext_of(main, wrapped, binding))
            result.update(
                _sweep(loadgen, configs, ca, request, sa_token, plaintext, base / "sweep")
            )
            if single is not None:
                single.stop()
                single = None
            if loadgen is not None and KEYSET_REPEATS > 0:
                result.update(
                    _keyset_case(loadgen, endpoint, ca, request, older, sa_token, sidecar, binding,
                                 pids, base / "keyset")
                )  # fmt: skip
            if loadgen is not None and FLOOD_TOKENS > 0:
                plaintext = asyncio.run(plaintext_of(sidecar, wrapped, binding))
                flood = _flood_case(
                    loadgen, sidecar, ca, request, sa_token, plaintext, base / "flood"
                )
                sidecar.stop()  # the same, with the per-address limit lifted
                sidecar = dataclasses.replace(
                    sidecar, extra_args=(*sidecar.extra_args, *_MANY_ADDRESSES)
                ).start()
                _wait_front_ends(sidecar, FRONT_ENDS)
                many = _flood_case(
                    loadgen, sidecar, ca, request, sa_token, plaintext, base / "flood-many"
                )
                result.update(
                    {
                        "unwrap_p99_under_flood_ms": flood["p99_ms"],
                        "unwrap_p99_under_flood_many_addresses_ms": many["p99_ms"],
                        "unwrap_flood": {
                            "forged_tokens": FLOOD_TOKENS,
                            "rate_s": FLOOD_RATE,
                            "one_address": flood,
                            "many_addresses": many,
                        },
                    }
                )
            return result
        finally:
            for running in (sidecar, single):
                if running is not None:
                    running.stop()
            plane.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
    sys.exit(0)
