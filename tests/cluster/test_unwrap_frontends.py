"""Unwrap on every core (issue 17): ``--workload-front-ends 3`` on a real sidecar, a real
SoftHSM2 token, real ServiceAccount tokens reviewed by the real kube-apiserver.

Three processes serve the one TLS port (SO_REUSEPORT); only the first owns the PKCS#11
worker, the others decrypt through their relay. Each connection lands on one of them, so the
tests open many connections and read from /metrics which front end served what.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import signal
import socket
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from kubernetes import client as k8s
from kustody.api.client import Binding, HsmClient
from kustody.client._proto import unwrap_pb2 as pb
from kustody.dev.controlplane import Cluster
from kustody.dev.stack import Sidecar
from kustody.dev.tokens import DevToken
from kustody_helpers import eventually
from test_unwrap import pki  # noqa: F401 (a fixture: the CA and the serving certificate)

FRONT_ENDS = 3
CONNECTIONS = 24
SA = "app"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class Setup:
    sidecar: Sidecar
    ca: bytes
    request: pb.UnwrapRequest
    plaintext: bytes
    token: str
    stranger: str  # a ServiceAccount token of another namespace

    def metrics(self) -> dict[str, float]:
        url = f"http://127.0.0.1:{self.sidecar.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("kustody_unwrap") and not line.startswith("#")
        }

    def front_end_pids(self) -> list[int]:
        first = self.sidecar.proc.pid()
        assert first is not None
        children = Path(f"/proc/{first}/task/{first}/children").read_text().split()
        return [int(c) for c in children if b"unwrap.frontend" in _cmdline(int(c))]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _sa_token(kube: Cluster, namespace: str, name: str) -> str:
    spec = k8s.V1TokenRequestSpec(audiences=["kustody"], expiration_seconds=3600)
    result = k8s.CoreV1Api(kube.api_client()).create_namespaced_service_account_token(
        name, namespace, k8s.AuthenticationV1TokenRequest(spec=spec)
    )
    token: str = result.status.token
    return token


@pytest.fixture(scope="module")
def setup(
    kube: Cluster,
    kustody_crds: Path,
    make_softhsm_token: Callable[[str], DevToken],
    pki: dict[str, Path],  # noqa: F811
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Setup]:
    ns, other = f"fe-{secrets.token_hex(3)}", f"fe-other-{secrets.token_hex(3)}"
    ring = f"frontends-{secrets.token_hex(3)}"
    for namespace in (ns, other):
        kube.kubectl("create", "namespace", namespace)
        kube.kubectl("create", "serviceaccount", SA, "-n", namespace)
    objects = [
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "KeyRing",
            "metadata": {"name": ring},
            "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [ns]}},
        },
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": "orders", "namespace": ns},
            "spec": {"keyRingRef": {"name": ring}, "secretName": "orders-dek", "consumers": [SA]},
        },
    ]
    kube.kubectl("apply", "-f", "-", input=json.dumps({"kind": "List", "apiVersion": "v1",
                                                        "items": objects}))  # fmt: skip
    sidecar = Sidecar(
        tmp_path_factory.mktemp("frontends"),
        make_softhsm_token("frontends"),
        name="frontends",
        workload_listen=f"127.0.0.1:{_free_port()}",
        workload_tls_cert=pki["cert"],
        workload_tls_key=pki["key"],
        kubeconfig=kube.kubeconfig,
        metrics_port=_free_port(),
        extra_args=("--workload-front-ends", str(FRONT_ENDS), "--workload-rate", "10000",
                    "--workload-burst", "10000"),
    ).start()  # fmt: skip
    binding = Binding(ns, "orders", {"app": "frontends"})

    async def wrap() -> tuple[str, bytes]:
        async with HsmClient.unix(sidecar.socket) as hsm:
            await hsm.create_key_version(ring, 1)
            wrapped = (await hsm.generate_data_key(ring, binding)).wrapped
            return wrapped, await hsm.decrypt(wrapped, binding, allow_plaintext_export=True)

    wrapped, plaintext = asyncio.run(wrap())
    request = pb.UnwrapRequest(
        wrapped=wrapped,
        key_ring=ring,
        namespace=ns,
        data_key="orders",
        encryption_context=dict(binding.context),
    )
    world = Setup(
        sidecar,
        pki["ca"].read_bytes(),
        request,
        plaintext,
        _sa_token(kube, ns, SA),
        _sa_token(kube, other, SA),
    )
    eventually(
        lambda: world.metrics().get("kustody_unwrap_front_ends") == FRONT_ENDS,
        60,
        f"{FRONT_ENDS} front ends serving",
    )
    try:
        yield world
    finally:
        sidecar.stop()
        kube.kubectl("delete", "namespace", ns, other, "--wait=false", check=False)
        kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)


async def _calls(setup: Setup, token: str, connections: int = CONNECTIONS) -> list[Any]:
    """One call on each of ``connections`` separate TLS connections: the answers, or the
    gRPC errors."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own each
    channels = [
        grpc.aio.secure_channel(
            setup.sidecar.workload_listen or "",
            grpc.ssl_channel_credentials(setup.ca),
            options=options,
        )
        for _ in range(connections)
    ]
    metadata = (("authorization", f"Bearer {token}"),)
    try:
        calls = [
            c.unary_unary(
                "/kustody.workload.v1.Unwrap/Unwrap",
                request_serializer=pb.UnwrapRequest.SerializeToString,
                response_deserializer=pb.UnwrapResponse.FromString,
            )(setup.request, metadata=metadata, timeout=20)
            for c in channels
        ]
        return list(await asyncio.gather(*calls, return_exceptions=True))
    finally:
        for c in channels:
            await c.close()


def _served(metrics: dict[str, float]) -> dict[str, float]:
    prefix = 'kustody_unwrap_front_end_requests_total{front_end="'
    return {k[len(prefix) : -2]: v for k, v in metrics.items() if k.startswith(prefix)}


def _ok(metrics: dict[str, float], namespace: str) -> float:
    return metrics.get(f'kustody_unwrap_requests_total{{namespace="{namespace}",outcome="ok"}}', 0)


def test_every_front_end_serves_unwraps_and_each_answer_is_the_key(setup: Setup) -> None:
    before = setup.metrics()
    served_before = _served(before)
    answers = asyncio.run(_calls(setup, setup.token))
    assert all(isinstance(a, pb.UnwrapResponse) for a in answers), answers
    assert {a.plaintext for a in answers} == {setup.plaintext}

    after = setup.metrics()
    served = {k: v - served_before.get(k, 0.0) for k, v in _served(after).items()}
    assert set(served) == {str(n) for n in range(FRONT_ENDS)}
    assert sum(served.values()) == CONNECTIONS
    # The kernel spread the connections: more than one process answered.
    assert sum(1 for v in served.values() if v > 0) >= 2, served
    # The summed counters count every call once, whichever process served it.
    assert _ok(after, setup.request.namespace) - _ok(before, setup.request.namespace) == CONNECTIONS


def test_every_front_end_applies_the_rules_a_token_of_another_namespace_is_refused(
    setup: Setup,
) -> None:
    served_before = _served(setup.metrics())
    answers = asyncio.run(_calls(setup, setup.stranger))
    assert all(isinstance(a, grpc.aio.AioRpcError) for a in answers), answers
    reasons = {dict(a.trailing_metadata() or ()).get("kustody-reason") for a in answers}
    assert reasons == {"NAMESPACE_MISMATCH"}
    served = {k: v - served_before.get(k, 0.0) for k, v in _served(setup.metrics()).items()}
    assert sum(1 for v in served.values() if v > 0) >= 2, served


def test_an_extra_front_end_that_dies_is_started_again_and_the_counts_stay(
    setup: Setup,
) -> None:
    pids = setup.front_end_pids()
    assert len(pids) == FRONT_ENDS - 1
    ok_before = _ok(setup.metrics(), setup.request.namespace)
    os.kill(pids[0], signal.SIGKILL)
    # The survivors take new connections at once; a call that hit the dying one's socket is
    # the only kind that may fail, and a client retries it.
    deadline = time.monotonic() + 30
    while True:
        answers = asyncio.run(_calls(setup, setup.token, connections=6))
        if all(isinstance(a, pb.UnwrapResponse) for a in answers):
            break
        assert time.monotonic() < deadline, answers
    eventually(
        lambda: (
            len(setup.front_end_pids()) == FRONT_ENDS - 1
            and pids[0] not in setup.front_end_pids()
            and setup.metrics().get("kustody_unwrap_front_ends") == FRONT_ENDS
        ),
        60,
        "the front end started again",
    )
    assert _ok(setup.metrics(), setup.request.namespace) >= ok_before + 6  # nothing went down
    log = setup.sidecar.proc.logfile.read_text(errors="replace")
    assert re.search(r"workload front end \d exited \(killed by SIGKILL\); starting it again", log)


def test_the_front_ends_die_with_the_first_one(setup: Setup) -> None:
    """Runs last: SIGKILL of the process that owns the token takes every front end with it
    (PR_SET_PDEATHSIG, and their relays close)."""
    pids = setup.front_end_pids()
    assert pids
    first = setup.sidecar.proc.pid()
    assert first is not None
    os.kill(first, signal.SIGKILL)
    eventually(
        lambda: not any(b"unwrap.frontend" in _cmdline(p) for p in pids), 30, "front ends gone"
    )
