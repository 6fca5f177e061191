"""Child processes with pidfiles: started, found again after a crash, and stopped for good.

Every process Kustody starts carries its state directory in its command line. That marker
is how a later ``dev down`` (or the next ``dev up``) tells our processes from unrelated ones
that reused a PID, and how it finds orphans whose pidfile was never written.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def cmdline(pid: int) -> str:
    """The process's command line, or "" when it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def find_marked(marker: str, programs: Sequence[str]) -> list[int]:
    """PIDs of live ``programs`` (by argv[0] basename) whose command line contains ``marker``.

    Matching the program as well keeps a shell that merely mentions the path out of reach.
    """
    own = os.getpid()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        pid = int(entry.name)
        line = cmdline(pid)
        if marker in line and Path(line.split(" ", 1)[0]).name in programs and _alive(pid):
            found.append(pid)
    return found


@dataclass
class ManagedProcess:
    """One child process, its log file and its pidfile."""

    name: str
    state_dir: Path
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pidfile(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.pid"

    @property
    def logfile(self) -> Path:
        return self.state_dir / "logs" / f"{self.name}.log"

    def start(self, argv: Sequence[str], *, detach: bool, env: dict[str, str] | None = None) -> int:
        """Start ``argv``; ``detach`` keeps it running after we exit, else it dies with us."""
        self.pidfile.parent.mkdir(parents=True, exist_ok=True)
        self.logfile.parent.mkdir(parents=True, exist_ok=True)
        with open(self.logfile, "ab") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if detach else _die_with_parent,
            )
        self.pidfile.write_text(f"{self.popen.pid}\n")
        return self.popen.pid

    def pid(self) -> int | None:
        """The PID from the pidfile if that process is still ours and alive."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and str(self.state_dir) in cmdline(pid) else None

    def exited(self) -> int | None:
        """The exit code if the child we started has exited."""
        return None if self.popen is None else self.popen.poll()

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.logfile.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def terminate(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after ``timeout`` seconds."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        _reap(pids)
        time.sleep(0.1)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    _reap(pids)


def _reap(pids: Sequence[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)


def accepts_unix(path: Path) -> bool:
    """Whether a server accepts connections on the unix socket ``path`` (a socket file alone
    is not enough: gRPC creates it before it listens)."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
