"""Workload unwrap benchmark, called by bench/hsm.py (``make bench-hsm``).

A real kube-apiserver (the local control plane) for TokenReview and the DataKey lookup, the
real `kustody hsm` process with the workload service on TLS, a real projected-style token
from the TokenRequest API. The cache holds the TokenReview and the DataKey after the warm-up,
so this measures the steady state of a pod unwrapping repeatedly: p50/p99/ops at
concurrency 16. The client shares the 2 cores with the sidecar (pre-built request, raw stub).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from kubernetes import client as k8s
from kustody.client._proto import unwrap_pb2 as pb
from kustody.dev import binaries
from kustody.dev.controlplane import ControlPlane
from kustody.dev.softhsm import create_token
from kustody.dev.stack import Sidecar
from kustody.domain.aad import Binding
from kustody.hsm.client import HsmClient

CONCURRENCY = 16
DURATION = float(os.environ.get("KUSTODY_BENCH_SECONDS", "3"))
REPO = Path(__file__).resolve().parents[1]
NS, SA, DK, RING = "bench", "app", "orders", "bench-unwrap"


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


async def _bench(endpoint: str, ca: bytes, request: pb.UnwrapRequest, token: str) -> dict[str, Any]:
    channels = [
        grpc.aio.secure_channel(endpoint, grpc.ssl_channel_credentials(ca)) for _ in range(4)
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
    rate, latencies, failures = await _load(stubs, request, metadata)
    for c in channels:
        await c.close()
    ordered = sorted(latencies)
    return {
        "unwrap_p50_ms": round(ordered[len(ordered) // 2] * 1000, 3),
        "unwrap_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 3),
        "unwrap_ops_s": round(rate, 1),
        "unwrap_concurrency": CONCURRENCY,
        "unwrap_failures": failures,
    }


def run() -> dict[str, Any]:
    """Start a control plane, a token and the sidecar; return the ``unwrap_*`` results."""
    with tempfile.TemporaryDirectory(prefix="kustody-bench-unwrap-") as tmp:
        base = Path(tmp)
        plane = ControlPlane(base / "cp", binaries=binaries.build(), log=lambda _: None)
        cluster = plane.start()
        sidecar: Sidecar | None = None
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
            cluster.kubectl("apply", "-f", "-", input=json.dumps(datakey))
            ca, cert, key = _tls(base)
            token = create_token(base / "token", "bench")
            sidecar = Sidecar(
                base / "hsm",
                token,
                workload_listen=f"127.0.0.1:{_free_port()}",
                workload_tls_cert=cert,
                workload_tls_key=key,
                kubeconfig=cluster.kubeconfig,
                extra_args=("--log-level", "WARNING", "--workload-rate", "1000000",
                            "--workload-burst", "1000000"),
            ).start()  # fmt: skip
            binding = Binding(NS, DK, {"app": "bench"})

            async def wrap() -> str:
                async with HsmClient.unix(sidecar.socket) as hsm:
                    await hsm.create_key_version(RING, 1)
                    return (await hsm.generate_data_key(RING, binding)).wrapped

            wrapped = asyncio.run(wrap())
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
            return asyncio.run(
                _bench(sidecar.workload_listen or "", ca.read_bytes(), request, sa_token)
            )
        finally:
            if sidecar is not None:
                sidecar.stop()
            plane.stop()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
    sys.exit(0)
