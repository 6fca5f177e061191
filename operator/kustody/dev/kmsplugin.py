"""``kustody-kms``, the Go KMS v2 plugin (``kms/`` in the source checkout), built with the
Go toolchain once per source version into the binary cache.

The binary's name carries a digest of its sources (``*.go``, ``go.mod``, ``go.sum``), so an
edited checkout builds a new one and a cached one is never stale. Tests, benchmarks and
``kustody dev build`` get it from :func:`build`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kustody.dev.processes import accepts_unix
from kustody.dev.tokens import DevToken
from kustody.errors import UserError

NAME = "kustody-kms"


def source_dir() -> Path:
    """The Go module: ``kms/`` of this checkout (``KUSTODY_KMS_SOURCE`` overrides it)."""
    override = os.environ.get("KUSTODY_KMS_SOURCE")
    candidate = Path(override) if override else Path(__file__).resolve().parents[3] / "kms"
    if not (candidate / "go.mod").is_file():
        raise UserError(
            f"building {NAME} needs a Kustody source checkout; {candidate} has no go.mod"
        )
    return candidate


def _digest(module: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(module.iterdir()):
        if path.suffix in (".go", ".mod", ".sum") and not path.name.endswith("_test.go"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """``${XDG_CACHE_HOME:-~/.cache}/kustody/kms``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "kustody" / "kms"


def build(log: Callable[[str], None] = print) -> Path:
    """The binary for the current sources, built if it is not in the cache yet (builds for
    sources not used for a week are removed then)."""
    module = source_dir()
    target = cache_dir() / f"{NAME}-{_digest(module)}"
    if target.is_file():
        target.touch()
        return target
    go = shutil.which("go")
    if go is None:
        raise UserError(f"building {NAME} needs Go (https://go.dev/dl/) on PATH")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    log(f"building {target} (go build; cached afterwards)")
    result = subprocess.run(
        [go, "build", "-trimpath", "-o", str(partial), "."],
        cwd=module,
        env={**os.environ, "CGO_ENABLED": "1"},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise UserError(f"go build of {NAME} failed:\n{result.stderr[-4000:]}")
    os.replace(partial, target)
    week_ago = time.time() - 7 * 24 * 3600
    for old in target.parent.glob(f"{NAME}-*"):
        if old != target and old.stat().st_mtime < week_ago:
            old.unlink(missing_ok=True)
    return target


@dataclass
class KmsPlugin:
    """``kustody-kms`` as a subprocess on ``token`` for ``key_ring``; its log goes to ``log``."""

    binary: Path
    token: DevToken
    key_ring: str
    socket: Path
    log: Path
    extra_args: tuple[str, ...] = ()
    process: subprocess.Popen[bytes] | None = None

    def argv(self) -> list[str]:
        return [
            str(self.binary), "--module", str(self.token.module),
            "--token-label", self.token.label, "--pin-file", str(self.token.pin_file),
            "--kms-socket", str(self.socket), "--kms-keyring", self.key_ring,
            *self.extra_args,
        ]  # fmt: skip

    def start(self, timeout: float = 30) -> KmsPlugin:
        """Started and accepting connections on its socket (its health is the caller's)."""
        self.socket.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.argv(),
                env={**os.environ, **self.token.env},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not accepts_unix(self.socket):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise UserError(f"{NAME} did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        return self

    def stop(self) -> str:
        """Stopped (SIGTERM, then SIGKILL after 10 s); returns its whole log."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log.read_text() if self.log.exists() else ""
