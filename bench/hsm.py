"""HSM sidecar benchmark (``make bench-hsm``) -> bench/results/hsm.json.

(a) raw: python-pkcs11 in this process, AES-256-GCM seal of a 32-byte DEK (token RNG nonce + DEK)
    under a token KEK, and unseal + seal for rewrap — the ceilings (see raw_rates);
(b) unary GenerateDataKey and Decrypt over the unix socket at concurrency 1, 16, 64;
(c) BatchGenerateDataKey and BatchReWrap (keys/s);
(d) each case's ratio to (a);
(e) ``implementations``: (a) and (c) per PKCS#11 implementation — SoftHSM2 (from the run above),
    Kryoptic, and Kryoptic with token-generated GCM IVs (``--gcm-iv token``) — each with its own
    ``ratio_to_raw`` (Kryoptic in a child process: one module per process).
The sidecar runs as a separate `kustody hsm` process, as in a pod. Numbers, not assertions.
"""

from __future__ import annotations

import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from kustody.api._proto import keyservice_pb2 as pb
from kustody.api._proto import keyservice_pb2_grpc as pb_grpc
from kustody.api.client import HsmClient
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from plot import plot_kms, plot_unwrap  # bench/plot.py: PNGs beside the JSON
from unwrap import run as unwrap_cases  # bench/unwrap.py: workload unwrap over TLS

from kms import run as kms_cases  # bench/kms.py: KMS v2 against a Go plugin

RESULTS = Path(__file__).parent / "results" / "hsm.json"
DURATION = float(os.environ.get("KUSTODY_BENCH_SECONDS", "3"))
# Every case runs this many times, interleaved with the others; the figures are the medians.
REPEATS = int(os.environ.get("KUSTODY_BENCH_REPEATS", "3"))
BATCH = 250
BINDING = Binding("bench", "dk", {"app": "bench"})
RING = "bench"


def raw_rates(token: DevToken) -> dict[str, float]:
    """In-process ceilings, doing the essential work of one batch item and nothing else.

    * ``seal``: a 32-byte DEK + 12-byte nonce from the token RNG (one C_GenerateRandom per 200
      items, as a batch does), AES-256-GCM under a *token* KEK created with the sidecar's own
      template (CKA_TOKEN, CKA_PRIVATE, CKA_SENSITIVE, not extractable), with the real AAD
      (envelope header ‖ DataKey binding). This is what one BatchGenerateDataKey item costs.
    * ``rewrap``: unseal under v1 + seal under v2 (token KEKs), nonces from the token RNG —
      what one BatchReWrap item costs.
    * ``seal_session_key``: the old baseline (a session key, CKA_TOKEN false), for reference:
      SoftHSM2 uses a session key about twice as fast as a token key, so it overstated raw.
    """
    os.environ.update(token.env)
    import pkcs11
    from kustody.domain.aad import associated_data
    from kustody.domain.envelope import header_for
    from kustody.domain.keyversion import KeyVersionRef
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
    from pkcs11.mechanisms import GCMParams

    template = {
        Attribute.PRIVATE: True,
        Attribute.SENSITIVE: True,
        Attribute.EXTRACTABLE: False,
        Attribute.SIGN: False,
        Attribute.VERIFY: False,
        Attribute.WRAP: False,
        Attribute.UNWRAP: False,
        Attribute.DERIVE: False,
    }
    refs = [KeyVersionRef("raw", 1), KeyVersionRef("raw", 2)]
    aads = [associated_data(header_for(ref), BINDING) for ref in refs]
    gcm = Mechanism.AES_GCM

    def timed(step: Callable[[int], None], per: int = 200) -> float:
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < DURATION:
            step(per)
            n += per
        return n / (time.perf_counter() - start)

    def measure() -> dict[str, float]:
        lib = pkcs11.lib(str(token.module))
        session = lib.get_token(token_label=token.label).open(
            user_pin=token.pin_file.read_text(), rw=True
        )

        def key(ref: KeyVersionRef | None) -> Any:
            return session.generate_key(
                KeyType.AES,
                256,
                store=ref is not None,
                id=ref.object_id if ref else None,
                label=ref.label if ref else None,
                capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
                template={**template, Attribute.TOKEN: ref is not None},
            )

        v1, v2, session_key = key(refs[0]), key(refs[1]), key(None)

        def seal_with(k: Any) -> Callable[[int], None]:
            def step(count: int) -> None:
                rnd = bytes(session.generate_random(44 * count * 8))
                for i in range(count):
                    o = 44 * i
                    k.encrypt(
                        rnd[o + 12 : o + 44],
                        mechanism=gcm,
                        mechanism_param=GCMParams(rnd[o : o + 12], aads[0], 128),
                    )

            return step

        nonce = bytes(session.generate_random(96))
        old = bytes(
            v1.encrypt(b"k" * 32, mechanism=gcm, mechanism_param=GCMParams(nonce, aads[0], 128))
        )

        def rewrap(count: int) -> None:
            rnd = bytes(session.generate_random(12 * count * 8))
            for i in range(count):
                dek = v1.decrypt(old, mechanism=gcm, mechanism_param=GCMParams(nonce, aads[0], 128))
                v2.encrypt(
                    dek,
                    mechanism=gcm,
                    mechanism_param=GCMParams(rnd[12 * i : 12 * i + 12], aads[1], 128),
                )

        samples: dict[str, list[float]] = {}
        for _ in range(REPEATS):  # interleaved; the median of each
            samples.setdefault("seal", []).append(timed(seal_with(v1)))
            samples.setdefault("rewrap", []).append(timed(rewrap))
            samples.setdefault("seal_session_key", []).append(timed(seal_with(session_key)))
        rates = {name: statistics.median(values) for name, values in samples.items()}
        for k in (v1, v2):
            k.destroy()
        session.close()
        return rates

    return measure()  # this bench process, before the sidecar (whose worker owns the token)


def start_sidecar(
    token: DevToken, directory: Path, gcm_iv: str = "auto"
) -> tuple[subprocess.Popen[bytes], Path]:
    socket = directory / "bench.sock"
    env = {**os.environ, **token.env, "KUSTODY_HSM_PIN_FILE": str(token.pin_file)}
    env["KUSTODY_HSM_GCM_IV"] = gcm_iv
    command = [
        sys.executable, "-m", "kustody", "hsm", "--module", str(token.module),
        "--token-label", token.label, "--socket", str(socket), "--log-level", "WARNING",
    ]  # fmt: skip
    process = subprocess.Popen(command, env=env)
    deadline = time.monotonic() + 30
    while not socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the sidecar did not start")
        time.sleep(0.05)
    return process, socket


async def load(concurrency: int, op: Callable[[int], Awaitable[int]]) -> tuple[float, list[float]]:
    """Run ``op`` from ``concurrency`` workers for DURATION; returns (items/s, latencies)."""
    latencies: list[float] = []
    items = 0
    stop = time.perf_counter() + DURATION

    async def worker(w: int) -> None:
        nonlocal items
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            done = await op(w * 1_000_000 + i)
            items += done
            latencies.append(time.perf_counter() - t0)
            i += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return items / (time.perf_counter() - start), latencies


def summary(rate: float, latencies: list[float], raw: float, **extra: Any) -> dict[str, Any]:
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        "ops_s": round(rate, 1),
        "p50_ms": round(statistics.median(ordered) * 1000, 3),
        "p99_ms": round(p99 * 1000, 3),
        "ratio_to_raw": round(rate / raw, 3),
        **extra,
        "load_1m": round(os.getloadavg()[0], 2),
    }


_MEDIANS = ("ops_s", "p50_ms", "p99_ms", "ratio_to_raw", "ratio_to_raw_seal")


def _median_case(reps: list[dict[str, Any]]) -> dict[str, Any]:
    """One case over its repetitions: the median of each figure, the min-max of ops/s and p99,
    the 1-minute load averages, and the repetitions themselves."""
    case = {k: v for k, v in reps[0].items() if k not in _MEDIANS and k != "load_1m"}
    for key in _MEDIANS:
        if key in reps[0]:
            case[key] = round(statistics.median(r[key] for r in reps), 3)
    case["ops_s_range"] = [min(r["ops_s"] for r in reps), max(r["ops_s"] for r in reps)]
    case["p99_ms_range"] = [min(r["p99_ms"] for r in reps), max(r["p99_ms"] for r in reps)]
    case["load_1m"] = [r["load_1m"] for r in reps]
    case["repeats"] = len(reps)
    return case


async def sidecar_cases(
    socket: Path,
    raw: dict[str, float],
    unary: tuple[int, ...] = (1, 16, 64),
    batches: tuple[int, ...] = (1, 4, 8),
    repeats: int = REPEATS,
) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    clients = [HsmClient.unix(socket) for _ in range(8)]
    setup = clients[0]
    await setup.create_key_version(RING, 1)
    await setup.create_key_version(RING, 2)
    sample = await setup.generate_data_key(RING, BINDING, version=1)

    # Batches: the requests are built once and the raw stubs are called, so the client (which
    # shares the 2 cores with the sidecar) spends as little CPU as possible per item.
    binding = pb.Binding(
        namespace=BINDING.namespace, name=BINDING.name, encryption_context=dict(BINDING.context)
    )
    generate_request = pb.BatchGenerateDataKeyRequest(
        items=[pb.GenerateDataKeyRequest(key_ring=RING, version=1, binding=binding)] * BATCH
    )
    stubs = [pb_grpc.KeyServiceStub(c._channel) for c in clients]  # type: ignore[no-untyped-call]
    first = await stubs[0].BatchGenerateDataKey(generate_request)
    rewrap_request = pb.BatchReWrapRequest(
        items=[
            pb.ReWrapRequest(wrapped=r.data_key.wrapped, binding=binding, to_version=2)
            for r in first.results
        ]
    )
    failures = 0
    runs: dict[str, list[dict[str, Any]]] = {}

    def record(name: str, case: dict[str, Any]) -> None:
        runs.setdefault(name, []).append(case)

    for _ in range(repeats):
        for concurrency in unary:

            async def generate(i: int) -> int:
                await clients[i // 1_000_000 % len(clients)].generate_data_key(RING, BINDING)
                return 1

            async def decrypt(i: int) -> int:
                await clients[i // 1_000_000 % len(clients)].decrypt(
                    sample.wrapped, BINDING, allow_plaintext_export=True
                )
                return 1

            for name, op in (("GenerateDataKey", generate), ("Decrypt", decrypt)):
                rate, lat = await load(concurrency, op)
                record(
                    f"unary_{name}_c{concurrency}",
                    summary(rate, lat, raw["seal"], concurrency=concurrency, batch=1),
                )

        def counted(results: Any) -> int:
            nonlocal failures
            bad = sum(1 for r in results if r.WhichOneof("result") == "error")
            failures += bad
            return len(results) - bad

        for concurrency in batches:

            async def batch_generate(i: int) -> int:
                stub = stubs[i // 1_000_000 % len(stubs)]
                return counted((await stub.BatchGenerateDataKey(generate_request)).results)

            async def batch_rewrap(i: int) -> int:
                stub = stubs[i // 1_000_000 % len(stubs)]
                return counted((await stub.BatchReWrap(rewrap_request)).results)

            for name, op, base in (
                ("BatchGenerateDataKey", batch_generate, "seal"),
                ("BatchReWrap", batch_rewrap, "rewrap"),
            ):
                rate, lat = await load(concurrency, op)
                record(
                    f"batch_{name}_c{concurrency}",
                    summary(
                        rate,
                        lat,
                        raw[base],
                        concurrency=concurrency,
                        batch=BATCH,
                        raw_baseline=base,
                        ratio_to_raw_seal=round(rate / raw["seal"], 3),
                    ),
                )
    if failures:
        raise SystemExit(f"{failures} batch items failed")
    cases.update({name: _median_case(reps) for name, reps in runs.items()})
    for client in clients:
        await client.close()
    return cases


NOTES = [
    "implementations: raw seal/rewrap and BatchGenerateDataKey/BatchReWrap at c=1 and 4 per "
    "PKCS#11 implementation, each ratio_to_raw against that implementation's own raw ceiling "
    "(softhsm2 from the main run; kryoptic and kryoptic_gcm_iv_token in child processes, the "
    "latter with --gcm-iv token: IVs from C_EncryptMessage, three PKCS#11 calls per seal). "
    "health names the capability profile the sidecar chose.",
    "raw_ops_s is raw['seal']: in-process seal of a 32-byte DEK with the real AAD under a token "
    "KEK (CKA_TOKEN/PRIVATE/SENSITIVE, the sidecar's template), DEK and nonce from the token RNG "
    "(one C_GenerateRandom per 200 items, as the sidecar does per batch).",
    "raw['rewrap'] is unseal + seal under token KEKs per item; BatchReWrap cases compare with it "
    "(raw_baseline) and also report ratio_to_raw_seal.",
    "raw['seal_session_key'] is the earlier baseline (a session key): SoftHSM2 uses session "
    "keys about twice as fast as token keys, so it overstated the ceiling for token KEKs.",
    "Batch cases pre-build requests and call the raw stubs; items that fail abort the bench.",
    "Since the worker-process change the sidecar is two processes: the gRPC front end (event "
    "loop) and the PKCS#11 worker (python -m kustody.pkcs11.worker, the only process that loads "
    "the module), joined by a socketpair. Batches overlap across requests (c>1): the worker "
    "seals batch n while the front end decodes/encodes batches n-1 and n+1. At c=1 the two "
    "still take turns within a batch (one round trip per batch).",
    "Within one batch the front end sends the items to the worker in chunks (8, 16, then 32 "
    "items) as soon as each is decoded and encodes each chunk's results when it comes back, so "
    "even at c=1 the worker seals while the front end decodes and encodes; the caller still makes "
    "one gRPC call per batch.",
    "load_avg is os.getloadavg() (1, 5, 15 min) before and after the run; this 2-core machine "
    "is shared with other test suites, so compare runs with similar load.",
    "Every case (raw, unary, batch, per implementation, unwrap, KMS) runs `repeats` times, "
    "interleaved with the other cases of its group; each figure is the median, with the min-max "
    "in *_range and the 1-minute load average at the end of each run in load_1m.",
    "kms_* come from bench/kms.py: Kustody's two KMS v2 plugins (kustody-kms in Go, kms/; the "
    "sidecar's --kms-socket in Python), a minimal reference Go plugin over PKCS#11 "
    "(bench/gokms) and no-crypto Python gRPC servers (the floors of any Python front end) on "
    "one SoftHSM2 token, the same Go client for all, the order rotating per repetition; "
    "kms_ratio_c1/c16 = kustody-kms's median ops/s over the reference's, the lower of Encrypt "
    "and Decrypt (target >= 0.8); kms_python_ratio_c1/c16 the same for the Python plugin.",
    "unwrap_* come from the Go load generator bench/unwrapload (built into the cache on first "
    "use): 16 callers over 16 TLS connections, pre-serialised request, every plaintext "
    "checked; the medians of unwrap_sweep's c16 runs against the sidecar's default front-end "
    "count (unwrap_front_ends; the sweep: 1, 4, 16 and 64 callers, the order rotating per "
    "repetition, the Python client at 16 after each). The sweep also runs against a sidecar "
    "with --workload-front-ends 1 on the same token, interleaved; unwrap_front_ends_ratio_c{N} "
    "= the default's median ops/s over that one's (target at c64: >= 1.7), with each "
    "repetition's own ratio in *_runs. unwrap_cpu_cores is what the client, the sidecar's front "
    "ends (together) and its PKCS#11 worker used of the 2 cores during the run; "
    "unwrap_python_client is the same load from a grpc.aio Python client.",
    "unwrap_p99_under_flood_ms is the same Go callers' p99 while 5,000 distinct forged tokens "
    "(valid-looking JWTs, random signatures) arrive at 1,000/s from the load generator's own "
    "connection to 127.0.0.1, with the default review limits; "
    "unwrap_p99_under_flood_many_addresses_ms the same with the per-address limit lifted (only "
    "the global review rate and the in-flight bound hold). unwrap_flood has what the flood got "
    "back (reasons, latency) and the TokenReviews it cost (the sidecar's own counter).",
]


def _kms_cases() -> dict[str, Any]:
    """bench/kms.py's cases; a failure there is recorded, not fatal to the rest."""
    try:
        return kms_cases()
    except (Exception, SystemExit) as exc:  # a bench: keep the other numbers, say what failed
        return {"kms_error": f"{type(exc).__name__}: {exc}"}


def _unwrap_cases() -> dict[str, Any]:
    """bench/unwrap.py's cases; a failure there is recorded, not fatal to the rest."""
    try:
        return unwrap_cases()
    except Exception as exc:  # a bench: keep the other numbers, say what failed
        return {"unwrap_error": f"{type(exc).__name__}: {exc}"}


IMPLEMENTATION_BATCHES = (1, 4)


async def _health(socket: Path) -> str:
    """The sidecar's Health message once it serves (it names the capability profile)."""
    async with HsmClient.unix(socket) as client:
        for _ in range(300):
            health = await client.health()
            if health.serving:
                break
            await asyncio.sleep(0.1)
        return health.message


def _per_implementation(
    raw: dict[str, float], cases: dict[str, Any], health: str
) -> dict[str, Any]:
    batch = {k: v for k, v in cases.items() if k.startswith("batch_")}
    return {
        "raw": {name: round(rate, 1) for name, rate in raw.items()},
        "health": health,
        "cases": batch,
        "ratio_to_raw": {k: v["ratio_to_raw"] for k, v in batch.items()},
    }


def one_implementation(kind: str, gcm_iv: str) -> dict[str, Any]:
    """Raw ceilings and batch rates on one implementation (run in a child process)."""
    with tempfile.TemporaryDirectory(prefix=f"kustody-bench-{kind}-") as tmp:
        token = create_token(Path(tmp) / "token", "bench", kind=kind)
        raw = raw_rates(token)
        process, socket = start_sidecar(token, Path(tmp), gcm_iv)
        try:
            health = asyncio.run(_health(socket))
            cases = asyncio.run(sidecar_cases(socket, raw, (), IMPLEMENTATION_BATCHES))
        finally:
            process.terminate()
            process.wait(timeout=10)
    return {"gcm_iv": gcm_iv, **_per_implementation(raw, cases, health)}


def implementation_in_child(kind: str, gcm_iv: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--implementation", kind, "--gcm-iv", gcm_iv]
    child = subprocess.run(command, capture_output=True, text=True, check=False)
    if child.returncode != 0:
        return {"gcm_iv": gcm_iv, "error": child.stderr.strip()[-2000:]}
    result: dict[str, Any] = json.loads(child.stdout.strip().splitlines()[-1])
    return result


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--implementation":
        print(json.dumps(one_implementation(sys.argv[2], sys.argv[4])))
        return 0
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory(prefix="kustody-bench-") as tmp:
        token = create_token(Path(tmp) / "token", "bench")
        raw = raw_rates(token)
        process, socket = start_sidecar(token, Path(tmp))
        try:
            health = asyncio.run(_health(socket))
            cases = asyncio.run(sidecar_cases(socket, raw))
        finally:
            process.terminate()
            process.wait(timeout=10)
    implementations = {
        "softhsm2": {"gcm_iv": "auto", **_per_implementation(raw, cases, health)},
        "kryoptic": implementation_in_child("kryoptic", "auto"),
        "kryoptic_gcm_iv_token": implementation_in_child("kryoptic", "token"),
    }
    result = {
        "raw_ops_s": round(raw["seal"], 1),
        "raw": {name: round(rate, 1) for name, rate in raw.items()},
        "duration_s_per_case": DURATION,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": cases,
        "implementations": implementations,
        "notes": NOTES,
        "repeats": REPEATS,
        **_unwrap_cases(),
        **_kms_cases(),
    }
    result["load_avg"] = {
        "before": load_before,
        "after": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    for name, rate in raw.items():
        print(f"raw in-process {name}: {rate:,.0f} ops/s")
    print(f"{'case':34} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x raw':>6}")
    for name, case in cases.items():
        print(
            f"{name:34} {case['ops_s']:>10,.0f} {case['p50_ms']:>8.2f} "
            f"{case['p99_ms']:>8.2f} {case['ratio_to_raw']:>6.2f}"
        )
    for impl, data in implementations.items():
        if "error" in data:
            print(f"{impl}: failed: {data['error'][-300:]}")
            continue
        ratios = ", ".join(f"{k} {v:.2f}" for k, v in data["ratio_to_raw"].items())
        print(f"{impl}: raw seal {data['raw']['seal']:,.0f}/s; x raw: {ratios}")
    for key in ("kms_ratio_c1", "kms_ratio_c16", "kms_python_ratio_c1", "kms_python_ratio_c16"):
        if key in result:
            verdict = "meets" if result[key] >= 0.8 else "MISSES"
            print(f"{key} = {result[key]} ({verdict} the 0.8 target)")
    if "unwrap_ops_s" in result:
        print(
            f"unwrap c{result['unwrap_concurrency']}: {result['unwrap_ops_s']:,.0f}/s, "
            f"p99 {result['unwrap_p99_ms']} ms (median of {result['unwrap_repeats']})"
        )
    print(f"wrote {RESULTS}")
    for path in (plot_kms(result), plot_unwrap(result)):
        if path is not None:
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
