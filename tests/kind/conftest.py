"""The container layer: the image built with podman (``make image``) and kind clusters whose
node image is built here (``tools/kind/build.py``). Nothing is pulled from a registry.

These tests skip only where podman cannot exist: not on PATH and no way to install it
(``tools/image/podman-setup.sh`` installs it with apt-get as root).
"""

from __future__ import annotations

import os
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


@pytest.fixture(scope="session")
def kind_build() -> dict[str, Path | str]:
    """The kind binary and node image (tools/kind/build.py: built once, cached)."""
    reason = podman_missing()
    if reason:
        pytest.skip(reason)
    started = time.monotonic()
    run([sys.executable, str(ROOT / "tools" / "kind" / "build.py")], timeout=3600)
    print(f"\nkind build (cached after the first): {time.monotonic() - started:.0f}s")
    sys.path.insert(0, str(ROOT / "tools" / "kind"))
    import build as kind_tools  # tools/kind/build.py
    from kustody.dev import binaries

    bins = binaries.require_binaries()
    return {
        "kind": kind_tools.bin_dir() / "kind",
        "node_image": kind_tools.NODE_IMAGE,
        "kubectl": bins.kubectl,
        "helm": bins.helm,
    }


@pytest.fixture(scope="session")
def kind_network() -> Iterator[str]:
    """The one podman network the kind nodes join, made by this test run and removed after.

    ``--internal``: no route off this machine, so nothing the cluster does (CoreDNS
    forwarding a name it does not know, say) leaves it. The host still reaches the nodes
    over the bridge (the API server's published port)."""
    subprocess.run(["podman", "network", "rm", "-f", KIND_NETWORK], capture_output=True)
    run(["podman", "network", "create", "--internal", "--disable-dns", KIND_NETWORK])
    os.environ["KIND_EXPERIMENTAL_PROVIDER"] = "podman"
    os.environ["KIND_EXPERIMENTAL_PODMAN_NETWORK"] = KIND_NETWORK
    yield KIND_NETWORK
    subprocess.run(["podman", "network", "rm", "-f", KIND_NETWORK], capture_output=True)
