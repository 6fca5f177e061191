"""Hygiene for the sidecar's child processes (the PKCS#11 worker, extra workload front ends):
they hold plaintext keys at times, and must not outlive the process that started them."""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import signal

_PR_SET_PDEATHSIG = 1
_PR_GET_DUMPABLE = 3
_PR_SET_DUMPABLE = 4


def harden() -> None:
    """No core dumps, and not dumpable (no core, /proc/<pid> owned by root, no ptrace by
    processes of the same uid). Raises OSError when either cannot be set."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 or libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0) failed")


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when ``parent`` dies (``PR_SET_PDEATHSIG``); exit at once if it
    already has."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        raise SystemExit(0)
