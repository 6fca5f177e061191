"""The container layer: the image built with podman (``make image``) and kind clusters whose
node image is built here (``tools/kind/build.py``). Nothing is pulled from a registry.

These tests skip only where podman cannot exist: not on PATH and no way to install it
(``tools/image/podman-setup.sh`` installs it with apt-get as root).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kind_helpers import IMAGE, ROOT, podman_missing, run


@pytest.fixture(scope="session")
def kustody_image() -> str:
    """The Kustody image, built with ``make image``'s script (podman's layer cache keeps a
    rebuild of an unchanged checkout to seconds)."""
    reason = podman_missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    out = run(
        ["bash", str(ROOT / "tools" / "image" / "build.sh")],
        env={**os.environ, "IMAGE": IMAGE},
        timeout=1800,
    )
    print(f"\nimage {IMAGE}: {out.strip().splitlines()[-1]} ({time.monotonic() - started:.0f}s)")
    return IMAGE


# -- kind ---------------------------------------------------------------------------------

KIND_NETWORK = "kustody-kind-test"
KIND_SUBNET = os.environ.get("KUSTODY_KIND_SUBNET", "10.89.77.0/24")
# Packets from the kind network to anywhere but itself are dropped where the host forwards
# them (mangle FORWARD comes before netavark's filter rules, which would masquerade them).
_FENCE = ["FORWARD", "-s", KIND_SUBNET, "!", "-d", KIND_SUBNET, "-j", "DROP"]


@pytest.fixture(scope="session")
def kind_build() -> dict[str, Path | str]:
    """The kind binary and node image (tools/kind/build.py: built once, cached)."""
    reason = podman_missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    run([sys.executable, str(ROOT / "tools" / "kind" / "build.py")], timeout=3600)
    print(f"\nkind build (cached after the first): {time.monotonic() - started:.0f}s")
    spec = importlib.util.spec_from_file_location(
        "kustody_kind_build", ROOT / "tools/kind/build.py"
    )
    assert spec is not None
    assert spec.loader is not None
    kind_tools = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(kind_tools)
    from kustody.dev import binaries

    bins = binaries.require_binaries()
    return {
        "kind": kind_tools.bin_dir() / "kind",
        "node_image": kind_tools.NODE_IMAGE,
        "kubectl": bins.kubectl,
        "helm": bins.helm,
    }


@pytest.fixture(scope="session")
def kind_network(request: pytest.FixtureRequest) -> Iterator[str]:
    """The one podman network the kind nodes join, made by this test run and removed after,
    fenced: nothing from it is forwarded off it (the host reaches the nodes over its bridge
    address; the nodes reach nothing beyond the network). CoreDNS is told not to forward
    either (the ``kind`` fixture). No DNS server on the network: nodes resolve nothing.

    Not ``--internal``: the host then has no address on the bridge, so the published API
    server port and the node addresses would be routed off the machine instead."""
    exists = subprocess.run(["podman", "network", "exists", KIND_NETWORK]).returncode == 0
    if not (exists and os.environ.get("KUSTODY_KIND_REUSE") == "1"):
        # `rm -f` also removes the containers on it: a node left by an interrupted run.
        subprocess.run(["podman", "network", "rm", "-f", KIND_NETWORK], capture_output=True)
        run(["podman", "network", "create", "--disable-dns", "--subnet", KIND_SUBNET, KIND_NETWORK])
    fenced = shutil.which("iptables") is not None
    if fenced:
        subprocess.run(["iptables", "-t", "mangle", "-D", *_FENCE], capture_output=True)
        run(["iptables", "-t", "mangle", "-I", *_FENCE[:1], "1", *_FENCE[1:]])
    os.environ["KIND_EXPERIMENTAL_PROVIDER"] = "podman"
    os.environ["KIND_EXPERIMENTAL_PODMAN_NETWORK"] = KIND_NETWORK
    try:
        yield KIND_NETWORK
    finally:
        # A kept cluster's node stays on it (`podman network rm -f` would remove the node).
        if not request.config.getoption("keep_cluster"):
            if fenced:
                subprocess.run(["iptables", "-t", "mangle", "-D", *_FENCE], capture_output=True)
            subprocess.run(["podman", "network", "rm", "-f", KIND_NETWORK], capture_output=True)
