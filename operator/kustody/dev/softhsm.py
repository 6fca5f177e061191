"""SoftHSM2 tokens for development and tests: each in its own directory with its own config."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from kustody.errors import UserError

MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
_INSTALL_HINT = "install it with `make system-deps` (apt-get install softhsm2 as root)"


def find_module() -> Path:
    """The SoftHSM2 PKCS#11 module, or a UserError naming the fix."""
    env = os.environ.get("KUSTODY_SOFTHSM2_MODULE")
    for candidate in ([env] if env else []) + list(MODULE_CANDIDATES):
        if Path(candidate).is_file():
            return Path(candidate)
    raise UserError(f"SoftHSM2's PKCS#11 module (libsofthsm2.so) was not found; {_INSTALL_HINT}")


def _softhsm2_util() -> str:
    util = shutil.which("softhsm2-util")
    if util is None:
        raise UserError(f"softhsm2-util is not on PATH; {_INSTALL_HINT}")
    return util


@dataclass(frozen=True)
class SoftHSMToken:
    """An initialised SoftHSM2 token. The PIN lives only in ``pin_file`` (mode 0600)."""

    directory: Path
    label: str
    module: Path
    conf: Path
    pin_file: Path
    so_pin_file: Path = field(repr=False)

    @property
    def env(self) -> dict[str, str]:
        """Environment a process needs to open this token (SOFTHSM2_CONF)."""
        return {"SOFTHSM2_CONF": str(self.conf)}


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)


def create_token(directory: Path, label: str = "kustody") -> SoftHSMToken:
    """Create (or reuse, if already initialised there) a token with random PINs in ``directory``."""
    module = find_module()
    util = _softhsm2_util()
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    tokens = directory / "tokens"
    tokens.mkdir(exist_ok=True, mode=0o700)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    pin_file, so_pin_file = directory / "user.pin", directory / "so.pin"
    token = SoftHSMToken(directory, label, module, conf, pin_file, so_pin_file)
    if pin_file.exists() and any(tokens.iterdir()):
        return token
    _write_secret(pin_file, secrets.token_hex(16))
    _write_secret(so_pin_file, secrets.token_hex(16))
    env = {**os.environ, **token.env}
    # softhsm2-util takes PINs only as arguments; they are random, per-directory dev PINs.
    result = subprocess.run(
        [
            util,
            "--init-token",
            "--free",
            "--label",
            label,
            "--pin",
            pin_file.read_text(),
            "--so-pin",
            so_pin_file.read_text(),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise UserError(
            f"softhsm2-util could not initialise token {label!r}: {result.stderr.strip()}"
        )
    return token
