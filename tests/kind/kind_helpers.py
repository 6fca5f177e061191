"""Helpers of the container layer (tests/kind): commands, waiting, where podman can be had."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("KUSTODY_TEST_IMAGE", "localhost/kustody:dev")


def podman_missing() -> str | None:
    """Why podman cannot be had here, or None."""
    if shutil.which("podman"):
        return None
    if os.geteuid() == 0 and shutil.which("apt-get"):
        return None  # tools/image/podman-setup.sh installs it
    return "podman is not installed and cannot be (not root with apt-get): apt-get install podman"


def run(cmd: list[str], *, check: bool = True, timeout: float = 600, **kw: Any) -> str:
    """Run a command; on failure the assertion shows its output."""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n"
            f"{proc.stderr[-3000:]}"
        )
    return proc.stdout


def eventually(check: Callable[[], Any], timeout: float, what: str, every: float = 2) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except (AssertionError, subprocess.CalledProcessError) as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last}")
