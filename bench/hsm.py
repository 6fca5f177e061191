"""HSM sidecar benchmark (``make bench-hsm``) -> bench/results/hsm.json.

(a) raw: in-process python-pkcs11, AES-256-GCM seal of a 32-byte DEK (token RNG nonce + DEK)
    under a token KEK — the ceiling the sidecar is compared with;
(b) unary GenerateDataKey and Decrypt over the unix socket at concurrency 1, 16, 64;
(c) BatchGenerateDataKey and BatchReWrap (keys/s);
(d) each case's ratio to (a).
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

from kustody.dev.softhsm import SoftHSMToken, create_token
from kustody.domain.aad import Binding
from kustody.hsm.client import GenerateItem, HsmClient

RESULTS = Path(__file__).parent / "results" / "hsm.json"
DURATION = float(os.environ.get("KUSTODY_BENCH_SECONDS", "3"))
BATCH = 250
BINDING = Binding("bench", "dk", {"app": "bench"})
RING = "bench"


def raw_rate(token: SoftHSMToken) -> float:
    os.environ.update(token.env)
    import pkcs11
    from kustody.hsm import thread
    from pkcs11 import Attribute, KeyType, Mechanism, MechanismFlag
    from pkcs11.mechanisms import GCMParams

    def measure() -> float:
        lib = pkcs11.lib(str(token.module))
        session = lib.get_token(token_label=token.label).open(
            user_pin=token.pin_file.read_text(), rw=True
        )
        key = session.generate_key(
            KeyType.AES,
            256,
            store=False,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template={Attribute.EXTRACTABLE: False, Attribute.SENSITIVE: True},
        )
        aad = b"x" * 60
        n = 0
        start = time.perf_counter()
        while time.perf_counter() - start < DURATION:
            for _ in range(200):
                rnd = session.generate_random((12 + 32) * 8)
                params = GCMParams(rnd[:12], aad, 128)
                key.encrypt(rnd[12:], mechanism=Mechanism.AES_GCM, mechanism_param=params)
            n += 200
        rate = n / (time.perf_counter() - start)
        session.close()
        return rate

    return thread.call(measure)


def start_sidecar(token: SoftHSMToken, directory: Path) -> tuple[subprocess.Popen[bytes], Path]:
    socket = directory / "bench.sock"
    env = {**os.environ, **token.env, "KUSTODY_HSM_PIN_FILE": str(token.pin_file)}
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
    }


async def sidecar_cases(socket: Path, raw: float) -> dict[str, dict[str, Any]]:
    cases: dict[str, dict[str, Any]] = {}
    clients = [HsmClient.unix(socket) for _ in range(8)]
    setup = clients[0]
    await setup.create_key_version(RING, 1)
    await setup.create_key_version(RING, 2)
    sample = await setup.generate_data_key(RING, BINDING, version=1)

    for concurrency in (1, 16, 64):

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
            cases[f"unary_{name}_c{concurrency}"] = summary(
                rate, lat, raw, concurrency=concurrency, batch=1
            )

    items = [GenerateItem(RING, BINDING, version=1)] * BATCH
    wrapped = [
        (k.wrapped, BINDING)
        for k in await setup.batch_generate_data_keys(items)
        if not isinstance(k, Exception)
    ]

    for concurrency in (1, 4):

        async def batch_generate(i: int) -> int:
            keys = await clients[i // 1_000_000 % len(clients)].batch_generate_data_keys(items)
            return len(keys)

        async def batch_rewrap(i: int) -> int:
            done = await clients[i // 1_000_000 % len(clients)].batch_rewrap(wrapped, to_version=2)
            return len(done)

        for name, op in (("BatchGenerateDataKey", batch_generate), ("BatchReWrap", batch_rewrap)):
            rate, lat = await load(concurrency, op)
            cases[f"batch_{name}_c{concurrency}"] = summary(
                rate, lat, raw, concurrency=concurrency, batch=BATCH
            )
    for client in clients:
        await client.close()
    return cases


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="kustody-bench-") as tmp:
        token = create_token(Path(tmp) / "token", "bench")
        raw = raw_rate(token)
        process, socket = start_sidecar(token, Path(tmp))
        try:
            cases = asyncio.run(sidecar_cases(socket, raw))
        finally:
            process.terminate()
            process.wait(timeout=10)
    result = {
        "raw_ops_s": round(raw, 1),
        "duration_s_per_case": DURATION,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "cases": cases,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"raw in-process seal: {raw:,.0f} ops/s")
    print(f"{'case':34} {'ops/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'x raw':>6}")
    for name, case in cases.items():
        print(
            f"{name:34} {case['ops_s']:>10,.0f} {case['p50_ms']:>8.2f} "
            f"{case['p99_ms']:>8.2f} {case['ratio_to_raw']:>6.2f}"
        )
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
