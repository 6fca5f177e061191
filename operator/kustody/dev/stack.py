"""Kustody's own processes for the demo and the tests: the HSM sidecar and the operator.

Each runs as ``python -m kustody ...`` in its own process (SoftHSM2 reads SOFTHSM2_CONF once
per process, and a crash test must be able to SIGKILL the operator), supervised like the
control plane: pidfiles, logs under the state directory, killed with their owner unless
detached.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kustody.dev.controlplane import Cluster
from kustody.dev.processes import ManagedProcess, terminate
from kustody.dev.tokens import DevToken
from kustody.errors import UserError


def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra or {})}
    env.pop("KUSTODY_HSM_PIN_FILE", None)
    return env


def _wait(proc: ManagedProcess, ready: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    check = ready if callable(ready) else (lambda: False)
    while time.monotonic() < deadline:
        code = proc.exited()
        if code is not None:
            raise UserError(
                f"{what} exited with code {code}; its log ends with:\n{proc.log_tail()}"
            )
        if check():
            return
        time.sleep(0.1)
    raise UserError(f"timed out waiting for {what}; see {proc.logfile}:\n{proc.log_tail()}")


@dataclass
class Sidecar:
    """``kustody hsm`` serving a SoftHSM2 (or any PKCS#11) token on a unix socket."""

    state_dir: Path
    token: DevToken
    name: str = "hsm"
    kms_keyring: str | None = None
    metrics_port: int | None = None
    detach: bool = False
    # The workload unwrap service (docs/unwrap.md): on when workload_listen is set.
    workload_listen: str | None = None
    workload_tls_cert: Path | None = None
    workload_tls_key: Path | None = None
    kubeconfig: Path | None = None
    extra_args: tuple[str, ...] = ()
    proc: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.proc = ManagedProcess(self.name, self.state_dir)

    @property
    def socket(self) -> Path:
        return self.state_dir / "run" / f"{self.name}.sock"

    @property
    def kms_socket(self) -> Path:
        return self.state_dir / "run" / f"{self.name}-kms.sock"

    def start(self, timeout: float = 30) -> Sidecar:
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        self.socket.unlink(missing_ok=True)
        argv = [
            sys.executable, "-m", "kustody", "hsm",
            "--module", str(self.token.module),
            "--token-label", self.token.label,
            "--pin-file", str(self.token.pin_file),
            "--socket", str(self.socket),
        ]  # fmt: skip
        if self.kms_keyring:
            self.kms_socket.unlink(missing_ok=True)
            argv += [
                "--kms-socket", str(self.kms_socket),
                "--kms-keyring", self.kms_keyring,
                "--kms-create-if-missing",
            ]  # fmt: skip
        if self.metrics_port:
            argv += ["--metrics-port", str(self.metrics_port), "--metrics-address", "127.0.0.1"]
        if self.workload_listen:
            argv += [
                "--workload-listen", self.workload_listen,
                "--workload-tls-cert", str(self.workload_tls_cert),
                "--workload-tls-key", str(self.workload_tls_key),
            ]  # fmt: skip
            if self.kubeconfig:
                argv += ["--kubeconfig", str(self.kubeconfig)]
        argv += list(self.extra_args)
        self.proc.start(argv, detach=self.detach, env=_python_env(self.token.env))
        _wait(self.proc, self._serving, timeout, "the HSM sidecar")
        return self

    def _serving(self) -> bool:
        if not self.socket.exists() or not self._workload_listening():
            return False
        from kustody.api.client import HsmClient, HsmError

        async def check() -> bool:
            async with HsmClient.unix(self.socket, timeout=2) as client:
                return (await client.health()).serving

        try:
            return asyncio.run(check())
        except HsmError:
            return False

    def _workload_listening(self) -> bool:
        if not self.workload_listen:
            return True
        host, _, port = self.workload_listen.rpartition(":")
        try:
            with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), 1):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        pid = self.proc.pid() or (self.proc.popen.pid if self.proc.popen else None)
        if pid is not None:
            terminate([pid])
        self.proc.pidfile.unlink(missing_ok=True)


@dataclass
class Operator:
    """``kustody operator`` against a cluster, talking to a sidecar's socket."""

    state_dir: Path
    cluster: Cluster
    hsm_socket: Path
    name: str = "operator"
    identity: str | None = None
    metrics_port: int | None = None
    extra_args: tuple[str, ...] = ()
    detach: bool = False
    proc: ManagedProcess = field(init=False)

    def __post_init__(self) -> None:
        self.proc = ManagedProcess(self.name, self.state_dir)

    def start(self) -> Operator:
        argv = [
            sys.executable, "-m", "kustody", "operator",
            "--kubeconfig", str(self.cluster.kubeconfig),
            "--hsm-socket", str(self.hsm_socket),
            "--identity", self.identity or self.name,
        ]  # fmt: skip
        if self.metrics_port:
            argv += ["--metrics-port", str(self.metrics_port)]
        argv += list(self.extra_args)
        self.cluster.kubectl("create", "namespace", "kustody-system", check=False)
        self.proc.start(argv, detach=self.detach, env=_python_env())
        return self

    def wait_active(self, timeout: float = 60) -> None:
        """Wait until the log says the operator holds the Lease and synced its caches."""

        def active() -> bool:
            try:
                return "synced" in self.proc.logfile.read_text(errors="replace")
            except OSError:
                return False

        _wait(self.proc, active, timeout, f"operator {self.name} to become active")

    def kill(self) -> None:
        """SIGKILL, as a node failure or an OOM kill would."""
        if self.proc.popen is not None and self.proc.popen.poll() is None:
            self.proc.popen.send_signal(signal.SIGKILL)
            self.proc.popen.wait()

    def stop(self) -> None:
        pid = self.proc.pid() or (self.proc.popen.pid if self.proc.popen else None)
        if pid is not None:
            terminate([pid], timeout=15)
        self.proc.pidfile.unlink(missing_ok=True)

    def log(self) -> str:
        try:
            return self.proc.logfile.read_text(errors="replace")
        except OSError:
            return ""
