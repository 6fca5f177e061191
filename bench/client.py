"""Workload keyset library benchmark (``make bench-client``) -> bench/results/client.json.

(a) One-shot encrypt and decrypt of 1 KiB and 1 MiB messages with ``kustody.client.Keyset``,
    each as a ratio to raw ``cryptography`` AESGCM on the same plaintext and associated data in
    the same run. The raw side does only the AEAD call (a fixed nonce, no framing, no key
    lookup): the ceiling. Repetitions interleave raw and library (alternating which goes
    first); the JSON gives the median ratio of the repetitions with min and max.
    Throughput is bytes per second of this thread's CPU time: the machine is shared, and a
    wall clock would measure the neighbours (wall-clock ratios are reported beside it).
(b) Streaming 256 MiB (``encrypt_stream`` to a file, then ``decrypt_stream`` into a hash) in a
    fresh process, the plaintext produced chunk by chunk and never held: peak RSS growth from
    /proc/self/status (VmHWM reset through /proc/self/clear_refs after setup, VmRSS before).
Numbers, not assertions. The load average (/proc/loadavg) is recorded before and after.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cryptography
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.client import Keyset

RESULTS = Path(__file__).parent / "results" / "client.json"
REPS = int(os.environ.get("KUSTODY_BENCH_REPS", "7"))
SECONDS = float(os.environ.get("KUSTODY_BENCH_SECONDS", "0.4"))  # CPU seconds per measurement
STREAM_BYTES = int(os.environ.get("KUSTODY_BENCH_STREAM_MIB", "256")) * 1024 * 1024
SIZES = {"1KiB": 1024, "1MiB": 1024 * 1024}
AD = b"orders/17"


def _keyset() -> tuple[Keyset, bytes]:
    dek = os.urandom(32)
    doc = {
        "format": "kustody.io/keyset/v1",
        "dataKey": {"namespace": "bench", "name": "dk"},
        "primaryKeyId": 7,
        "keys": [
            {"keyId": 3, "generation": 1, "status": "DecryptOnly", "key": _b64(os.urandom(32))},
            {"keyId": 7, "generation": 2, "status": "Primary", "key": _b64(dek)},
        ],
    }
    return Keyset.from_json(json.dumps(doc)), dek


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def _loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


def _measure(op: Callable[[], object], size: int) -> tuple[float, float]:
    """Bytes/s of thread CPU time and of wall time, over about SECONDS of CPU time."""
    op()  # warm (allocator, per-thread buffer)
    batch = max(1, int(2_000_000 / size))
    n = 0
    cpu0, wall0 = time.thread_time(), time.perf_counter()
    while time.thread_time() - cpu0 < SECONDS:
        for _ in range(batch):
            op()
        n += batch
    cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
    return n * size / cpu, n * size / wall


def one_shot() -> dict[str, Any]:
    keyset, dek = _keyset()
    baseline = AESGCM(dek)
    results: dict[str, Any] = {}
    for label, size in SIZES.items():
        plaintext = os.urandom(size)
        nonce = os.urandom(12)
        raw_ct = baseline.encrypt(nonce, plaintext, AD)
        lib_ct = keyset.encrypt(plaintext, AD)
        assert keyset.decrypt(lib_ct, AD) == plaintext
        cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
            "encrypt": (
                lambda p=plaintext, n=nonce: baseline.encrypt(n, p, AD),
                lambda p=plaintext: keyset.encrypt(p, AD),
            ),
            "decrypt": (
                lambda c=raw_ct, n=nonce: baseline.decrypt(n, c, AD),
                lambda c=lib_ct: keyset.decrypt(c, AD),
            ),
        }
        for name, (raw_op, lib_op) in cases.items():
            samples: dict[str, list[float]] = {k: [] for k in ("raw", "lib", "raw_w", "lib_w")}
            for rep in range(REPS):
                order = [("raw", raw_op), ("lib", lib_op)]
                for side, op in order if rep % 2 == 0 else reversed(order):
                    cpu_rate, wall_rate = _measure(op, size)
                    samples[side].append(cpu_rate)
                    samples[f"{side}_w"].append(wall_rate)
            ratios = [lib / raw for lib, raw in zip(samples["lib"], samples["raw"], strict=True)]
            wall_ratios = [
                lib / raw for lib, raw in zip(samples["lib_w"], samples["raw_w"], strict=True)
            ]
            results[f"{name}_{label}"] = {
                "ratio_to_raw": round(statistics.median(ratios), 3),
                "ratio_min": round(min(ratios), 3),
                "ratio_max": round(max(ratios), 3),
                "ratio_to_raw_wall": round(statistics.median(wall_ratios), 3),
                "ratio_wall_min": round(min(wall_ratios), 3),
                "ratio_wall_max": round(max(wall_ratios), 3),
                "lib_MB_s": round(statistics.median(samples["lib"]) / 1e6, 1),
                "raw_MB_s": round(statistics.median(samples["raw"]) / 1e6, 1),
                "repetitions": REPS,
            }
            print(f"{name} {label}: {results[f'{name}_{label}']}", flush=True)
    return results


# -- streaming, in a child process -----------------------------------------------------------


class _Generated(io.RawIOBase):
    """``total`` bytes of a repeating 1 MiB random block, produced on demand; also hashes them."""

    def __init__(self, total: int) -> None:
        self._left = total
        self._block = os.urandom(1024 * 1024)
        self._offset = 0
        self.digest = hashlib.sha256()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = min(len(buffer), self._left, len(self._block) - self._offset)
        chunk = self._block[self._offset : self._offset + n]
        buffer[:n] = chunk
        self.digest.update(chunk)
        self._left -= n
        self._offset = (self._offset + n) % len(self._block)
        return n


class _HashSink(io.RawIOBase):
    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        self.digest.update(data)
        self.size += len(data)
        return len(data)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def stream_child() -> dict[str, Any]:
    keyset, _ = _keyset()
    keyset.encrypt(b"warm")
    source = _Generated(STREAM_BYTES)
    sink = _HashSink()
    with tempfile.TemporaryDirectory(prefix="kustody-bench-") as tmp:
        path = Path(tmp) / "stream.bin"
        baseline_kib = _status_kib("VmRSS")
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            hwm_reset = True
        except OSError:
            hwm_reset = False
        start, cpu_start = time.perf_counter(), time.process_time()
        with path.open("wb") as dst:
            keyset.encrypt_stream(source, dst, AD)  # type: ignore[arg-type]
        encrypted, cpu_encrypted = time.perf_counter(), time.process_time()
        with path.open("rb") as src:
            keyset.decrypt_stream(src, sink, AD)  # type: ignore[arg-type]
        done, cpu_done = time.perf_counter(), time.process_time()
        peak_kib = _status_kib("VmHWM")
        ciphertext_bytes = path.stat().st_size
    assert sink.size == STREAM_BYTES
    assert sink.digest.digest() == source.digest.digest(), "stream round trip differs"
    return {
        "bytes": STREAM_BYTES,
        "ciphertext_bytes": ciphertext_bytes,
        "segment_size": 1024 * 1024,
        "rss_before_MiB": round(baseline_kib / 1024, 1),
        "peak_rss_MiB": round(peak_kib / 1024, 1),
        "peak_rss_growth_MiB": round((peak_kib - baseline_kib) / 1024, 1),
        "peak_reset_with_clear_refs": hwm_reset,
        # CPU includes producing and hashing the plaintext and the file I/O, not only AES-GCM.
        "encrypt_MB_s_cpu": round(STREAM_BYTES / (cpu_encrypted - cpu_start) / 1e6, 1),
        "decrypt_MB_s_cpu": round(STREAM_BYTES / (cpu_done - cpu_encrypted) / 1e6, 1),
        "encrypt_MB_s_wall": round(STREAM_BYTES / (encrypted - start) / 1e6, 1),
        "decrypt_MB_s_wall": round(STREAM_BYTES / (done - encrypted) / 1e6, 1),
    }


def streaming() -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--stream-child"],
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"streaming: {result}", flush=True)
    return result


def main() -> int:
    if sys.argv[1:] == ["--stream-child"]:
        print(json.dumps(stream_child()))
        return 0
    load_before = _loadavg()
    results: dict[str, Any] = {
        "one_shot": one_shot(),
        "streaming_256MiB": streaming(),
    }
    load_after = _loadavg()
    results["targets"] = {
        "ratio_at_1MiB_min_0.9": {
            op: results["one_shot"][f"{op}_1MiB"]["ratio_to_raw"] >= 0.9
            for op in ("encrypt", "decrypt")
        },
        "stream_rss_growth_max_32MiB": results["streaming_256MiB"]["peak_rss_growth_MiB"] <= 32,
    }
    results["load_average"] = {"before": load_before, "after": load_after}
    results["machine"] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "cryptography": cryptography.__version__,
        "measure": f"median of {REPS} interleaved repetitions, {SECONDS}s CPU each",
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
