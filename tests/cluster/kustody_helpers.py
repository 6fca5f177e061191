"""Small helpers for the operator's cluster tests (not fixtures: plain functions)."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from kustody.api.client import Binding, HsmClient
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.stack import Sidecar
from kustody.testing.plugin import crds_dir

T = TypeVar("T")


def eventually(check: Callable[[], T | None], timeout: float = 60, what: str = "it") -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` on timeout."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


def apply(kube: Cluster, manifest: str) -> None:
    kube.kubectl("apply", "--server-side", "-f", "-", input=manifest)


def get(kube: Cluster, kind: str, name: str, namespace: str | None = None) -> dict[str, Any] | None:
    args = ["get", kind, name, "-o", "json", "--show-managed-fields"]
    if namespace:
        args += ["-n", namespace]
    result = kube.kubectl(*args, check=False)
    return json.loads(result.stdout) if result.returncode == 0 else None


def condition(obj: Mapping[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((obj or {}).get("status") or {}).get("conditions") or ():
        if c.get("type") == type_:
            return dict(c)
    return {}


def ready(obj: Mapping[str, Any] | None) -> bool:
    return condition(obj, "Ready").get("status") == "True"


def secret_data(secret: Mapping[str, Any]) -> dict[str, str]:
    # Text entries as str; binary ones (a plaintext key) are not compared as text.
    return {
        k: base64.b64decode(v).decode(errors="replace")
        for k, v in (secret.get("data") or {}).items()
    }


def unwrap(socket: Path, secret: Mapping[str, Any], keys: Mapping[str, str] | None = None) -> bytes:
    """Decrypt a DataKey Secret's wrapped key through the sidecar (as the operator may)."""
    keys = keys or {"wrapped": "wrapped-key", "context": "encryption-context"}
    data = secret_data(secret)
    context = json.loads(data[keys["context"]])
    binding = Binding(context["namespace"], context["dataKey"], context["encryptionContext"])

    async def call() -> bytes:
        async with HsmClient.unix(socket) as hsm:
            return await hsm.decrypt(data[keys["wrapped"]], binding, allow_plaintext_export=True)

    return asyncio.run(call())


def keyring(name: str, namespaces: list[str], policy: str | None = None, **spec: Any) -> str:
    body: dict[str, Any] = {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "KeyRing",
        "metadata": {"name": name},
        "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": namespaces}, **spec},
    }
    if policy:
        body["spec"]["rotationPolicyRef"] = {"name": policy}
    return json.dumps(body)


def datakey(name: str, namespace: str, keyring_name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "DataKey",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"keyRingRef": {"name": keyring_name}, "secretName": f"{name}-dek", **spec},
        }
    )


def policy(name: str, **spec: Any) -> str:
    return json.dumps(
        {
            "apiVersion": "kustody.io/v1alpha1",
            "kind": "RotationPolicy",
            "metadata": {"name": name},
            "spec": {"rotationPeriod": "2160h", **spec},
        }
    )


def kustody_cli(kube: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kustody", *args, "--kubeconfig", str(kube.kubeconfig)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ready_datakey(kube: Cluster, name: str, ns: str, timeout: float = 60) -> dict[str, Any]:
    return eventually(
        lambda: (o := get(kube, "datakey", name, ns)) and ready(o) and o,
        timeout,
        f"DataKey {ns}/{name} to be Ready",
    )


def event_reasons(kube: Cluster, ns: str, name: str) -> list[str]:
    out = kube.kubectl(
        "get", "events", "-n", ns, "-o", "json",
        "--field-selector", f"involvedObject.name={name}",
    ).stdout  # fmt: skip
    return [e["reason"] for e in json.loads(out)["items"]]


def describe(sidecar: Sidecar, ring: str) -> Any:
    async def call() -> Any:
        async with HsmClient.unix(sidecar.socket) as hsm:
            return await hsm.describe_key(ring)

    return asyncio.run(call())


def isolated_plane(kube: Cluster, directory: Path) -> Iterator[Cluster]:
    """A control plane of its own (same binaries as ``kube``) with the CRDs applied, for
    tests that kill or replace Kustody's processes; stopped when the generator closes."""
    plane = ControlPlane(directory, binaries=kube.binaries, log=lambda _: None)
    cluster = plane.start()
    try:
        cluster.kubectl("apply", "--server-side", "-f", str(crds_dir()))
        cluster.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")
        yield cluster
    finally:
        plane.stop()


def expire_destruction(kube: Cluster, keyring_obj: Mapping[str, Any], index: int = 0) -> None:
    """Move one version's destroyAt into the past, as if the waiting period had run out."""
    versions = [dict(v) for v in keyring_obj["status"]["versions"]]
    versions[index]["destroyAt"] = "2020-01-01T00:00:00Z"
    kube.kubectl(
        "patch", "keyring", keyring_obj["metadata"]["name"], "--subresource=status",
        "--type=merge", "-p", json.dumps({"status": {"versions": versions}}),
    )  # fmt: skip
