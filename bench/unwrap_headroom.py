"""Headroom for several unwrap front ends (issue 17): ``python bench/unwrap_headroom.py``.

Not part of ``make bench-hsm``. One whole sidecar against two whole sidecars (each its own
front end *and* PKCS#11 worker, on one token, serving one workload port through
SO_REUSEPORT, which gRPC sets by default), the Go load generator at 16 and 64 callers over
``CONNS`` (16) TLS connections so that the kernel spreads them, the two setups alternating
for ``REPS`` (3) repetitions. Two sidecars are an upper bound for several front ends sharing
one worker: what the machine gives when the front end's work runs twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import unwrap as u
from kubernetes import client as k8s
from kustody.api.client import HsmClient
from kustody.dev import binaries
from kustody.dev.controlplane import ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Sidecar
from kustody.domain.aad import Binding

CONNS = int(os.environ.get("CONNS", "16"))
REPS = int(os.environ.get("REPS", "3"))


def _apply(cluster: Any, obj: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", input=json.dumps(obj))


def main() -> int:
    u.CONNECTIONS = CONNS
    with tempfile.TemporaryDirectory(prefix="kustody-headroom-") as tmp:
        base = Path(tmp)
        plane = ControlPlane(base / "cp", binaries=binaries.build(), log=lambda _: None)
        cluster = plane.start()
        sidecars: list[Sidecar] = []
        try:
            cluster.kubectl("apply", "--server-side", "-f", str(u.REPO / "crds"))
            cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                            "crd/datakeys.kustody.io", "crd/keyrings.kustody.io")  # fmt: skip
            cluster.kubectl("create", "namespace", u.NS)
            cluster.kubectl("create", "serviceaccount", u.SA, "-n", u.NS)
            spec = {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [u.NS]}}
            _apply(cluster, {"apiVersion": "kustody.io/v1alpha1", "kind": "KeyRing",
                             "metadata": {"name": u.RING}, "spec": spec})  # fmt: skip
            dk_spec = {"keyRingRef": {"name": u.RING}, "secretName": "x", "consumers": [u.SA]}
            meta = {"name": u.DK, "namespace": u.NS}
            _apply(cluster, {"apiVersion": "kustody.io/v1alpha1", "kind": "DataKey",
                             "metadata": meta, "spec": dk_spec})  # fmt: skip
            ca, cert, key = u._tls(base)
            token = create_token(base / "token", "bench")
            listen = f"127.0.0.1:{u._free_port()}"

            def make(i: int) -> Sidecar:
                return Sidecar(
                    base / f"hsm{i}", token, workload_listen=listen, workload_tls_cert=cert,
                    workload_tls_key=key, kubeconfig=cluster.kubeconfig,
                    metrics_port=u._free_port(),
                    extra_args=("--log-level", "WARNING", "--workload-rate", "1000000",
                                "--workload-burst", "1000000"),
                )  # fmt: skip

            first = make(0).start()
            sidecars.append(first)
            binding = Binding(u.NS, u.DK, {"app": "bench"})

            async def wrap() -> str:
                async with HsmClient.unix(first.socket) as hsm:
                    await hsm.create_key_version(u.RING, 1)
                    return (await hsm.generate_data_key(u.RING, binding)).wrapped

            wrapped = asyncio.run(wrap())
            request_spec = k8s.V1TokenRequestSpec(audiences=["kustody"], expiration_seconds=3600)
            sa_token = (
                k8s.CoreV1Api(cluster.api_client())
                .create_namespaced_service_account_token(
                    u.SA, u.NS, k8s.AuthenticationV1TokenRequest(spec=request_spec)
                )
                .status.token
            )
            context = dict(binding.context)
            request = u.pb.UnwrapRequest(wrapped=wrapped, key_ring=u.RING, namespace=u.NS,
                                         data_key=u.DK, encryption_context=context)  # fmt: skip
            plaintext = asyncio.run(u.plaintext_of(first, wrapped, binding))
            loadgen = u.build_loadgen()
            if loadgen is None:
                raise SystemExit("needs Go for the load generator")
            second: Sidecar | None = None
            results: dict[tuple[str, int], list[dict[str, Any]]] = {}
            for rep in range(REPS):
                for mode in ("one", "two") if rep % 2 == 0 else ("two", "one"):
                    if mode == "two" and second is None:
                        second = make(1).start()
                        sidecars.append(second)
                    if mode == "one" and second is not None:
                        second.stop()
                        sidecars.remove(second)
                        second = None
                    pids = []
                    for sidecar in sidecars:
                        pid = sidecar.proc.pid()
                        assert pid is not None
                        pids += [pid, *u._children(pid)]
                    for c in (16, 64):
                        out = u._go_bench(loadgen, listen, ca, request, sa_token, plaintext, pids,
                                          base / f"{mode}-{c}-{rep}", concurrency=c)  # fmt: skip
                        results.setdefault((mode, c), []).append(out)
            for (mode, c), runs in sorted(results.items()):
                ops = [r["ops_s"] for r in runs]
                p99 = [r["p99_ms"] for r in runs]
                print(
                    f"{mode} sidecar(s) c={c}: {statistics.median(ops):,.0f}/s "
                    f"({min(ops):,.0f}-{max(ops):,.0f}), p99 {statistics.median(p99):.1f} ms "
                    f"({min(p99):.1f}-{max(p99):.1f}); 1-min load before "
                    f"{[r['load_1m_before'] for r in runs]}"
                )
            for c in (16, 64):
                two = statistics.median(r["ops_s"] for r in results[("two", c)])
                one = statistics.median(r["ops_s"] for r in results[("one", c)])
                print(f"c={c}: two / one = {two / one:.2f}")
        finally:
            for sidecar in sidecars:
                sidecar.stop()
            plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
