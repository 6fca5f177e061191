"""`kustody dev up/down` and the ControlPlane supervisor: faults give one clear message and
nothing is left running."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from kustody.dev.binaries import Binaries
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.processes import find_marked
from kustody.errors import UserError

PROGRAMS = ("etcd", "kube-apiserver", "kube-controller-manager")


def _ours(state_dir: Path) -> list[int]:
    return find_marked(str(state_dir.resolve()), PROGRAMS)


def _wait_gone(state_dir: Path, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while _ours(state_dir) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _ours(state_dir) == [], "control-plane processes were left running"


def _kustody(*args: str, state_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kustody", "dev", *args, "--state-dir", str(state_dir)],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def bins(kube: Cluster) -> Binaries:
    return kube.binaries


def test_port_in_use_is_a_clear_error_and_starts_nothing(bins: Binaries, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=rf"port {port} .* already in use.*--port"):
            ControlPlane(tmp_path / "cp", binaries=bins, apiserver_port=port).start()
    assert _ours(tmp_path / "cp") == []


def test_cli_up_down_and_stale_pidfile(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    (state / "run").mkdir(parents=True)
    # A pidfile from a crashed run, naming a PID that is now some unrelated process (ours).
    (state / "run" / "kube-apiserver.pid").write_text(f"{os.getpid()}\n")

    up = _kustody("up", state_dir=state)
    assert up.returncode == 0, up.stderr
    assert "removing stale pidfile" in up.stdout
    assert "ready in" in up.stdout
    assert "export KUBECONFIG=" in up.stdout
    assert len(_ours(state)) == 3

    again = _kustody("up", state_dir=state)
    assert "already running" in again.stdout

    down = _kustody("down", state_dir=state)
    assert "stopped: etcd, kube-apiserver, kube-controller-manager" in down.stdout
    _wait_gone(state)
    assert _kustody("status", state_dir=state).returncode == 1


def test_killed_owner_leaves_no_orphans(tmp_path: Path, bins: Binaries) -> None:
    state = tmp_path / "cp"
    bin_dir = str(bins.directory)
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from kustody.dev.binaries import Binaries\n"
        "from kustody.dev.controlplane import ControlPlane\n"
        f"ControlPlane(Path({str(state)!r}), binaries=Binaries(Path({bin_dir!r}))).start()\n"
        "print('READY', flush=True)\n"
        "time.sleep(600)\n"
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    assert "READY" in owner.stdout.readline() + owner.stdout.readline()
    assert len(_ours(state)) == 3
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    _wait_gone(state)


def test_detached_orphans_without_pidfiles_are_found_by_down(tmp_path: Path) -> None:
    state = tmp_path / "cp"
    assert _kustody("up", state_dir=state).returncode == 0
    for pidfile in (state / "run").glob("*.pid"):
        pidfile.unlink()
    assert "stopped: orphan" in _kustody("down", state_dir=state).stdout
    _wait_gone(state)
