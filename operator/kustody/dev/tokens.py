"""Development and test tokens of more than one PKCS#11 implementation.

``create_token(directory, label, kind)`` makes a fresh, initialised token of ``kind`` in its own
directory with random PINs kept only in files (mode 0600):

``softhsm2``
    SoftHSM2 (Debian package), see :mod:`kustody.dev.softhsm`.
``kryoptic``
    Kryoptic, a PKCS#11 soft token in Rust, built once by ``tools/install-kryoptic.sh`` into
    ``${XDG_CACHE_HOME:-~/.cache}/kustody/kryoptic/<version>/``; one sqlite token per directory,
    named by ``KRYOPTIC_CONF``. It is initialised through its own C_InitToken/C_InitPIN in a
    child process that reads the PINs from their files (no PIN in argv or the environment).

The kind defaults to ``$KUSTODY_TEST_TOKEN`` (``softhsm2`` when unset): ``make test`` runs the
HSM test layer once per kind.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from kustody.dev import softhsm
from kustody.dev.softhsm import SoftHSMToken
from kustody.errors import UserError

KINDS = ("softhsm2", "kryoptic")
KRYOPTIC_VERSION = "1.5.4"
_KRYOPTIC_SLOT = 1
_KRYOPTIC_HINT = "build it with `bash tools/install-kryoptic.sh` (part of `make install`)"


def selected_kind() -> str:
    """The token implementation tests run on: ``$KUSTODY_TEST_TOKEN`` or ``softhsm2``."""
    kind = os.environ.get("KUSTODY_TEST_TOKEN", "") or "softhsm2"
    if kind not in KINDS:
        raise UserError(f"KUSTODY_TEST_TOKEN={kind!r}: must be one of {', '.join(KINDS)}")
    return kind


def kryoptic_module() -> Path:
    """Kryoptic's PKCS#11 module (``$KUSTODY_KRYOPTIC_MODULE`` or the build cache)."""
    env = os.environ.get("KUSTODY_KRYOPTIC_MODULE")
    if env:
        return Path(env)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "kustody" / "kryoptic" / KRYOPTIC_VERSION / "libkryoptic_pkcs11.so"


def find_module(kind: str) -> Path:
    if kind == "softhsm2":
        return softhsm.find_module()
    module = kryoptic_module()
    if not module.is_file():
        raise UserError(f"Kryoptic's PKCS#11 module {module} was not found; {_KRYOPTIC_HINT}")
    return module


@dataclass(frozen=True)
class KryopticToken:
    """An initialised Kryoptic token; the same fields as :class:`SoftHSMToken`."""

    directory: Path
    label: str
    module: Path
    conf: Path
    pin_file: Path
    so_pin_file: Path = field(repr=False)
    kind: str = "kryoptic"

    @property
    def env(self) -> dict[str, str]:
        """Environment a process needs to open this token (KRYOPTIC_CONF)."""
        return {"KRYOPTIC_CONF": str(self.conf)}


DevToken = SoftHSMToken | KryopticToken


def kind_of(token: DevToken) -> str:
    return token.kind if isinstance(token, KryopticToken) else "softhsm2"


def _write_secret(path: Path, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(value)


def create_token(directory: Path, label: str = "kustody", kind: str | None = None) -> DevToken:
    """A fresh token of ``kind`` (default :func:`selected_kind`) in ``directory``."""
    kind = kind or selected_kind()
    if kind == "softhsm2":
        return softhsm.create_token(directory, label)
    if kind != "kryoptic":
        raise UserError(f"unknown token kind {kind!r}: one of {', '.join(KINDS)}")
    module = find_module(kind)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    conf = directory / "kryoptic.conf"
    database = directory / "token.sql"
    conf.write_text(
        f'[[slots]]\nslot = {_KRYOPTIC_SLOT}\ndbtype = "sqlite"\ndbargs = "{database}"\n'
    )
    pin_file, so_pin_file = directory / "user.pin", directory / "so.pin"
    token = KryopticToken(directory, label, module, conf, pin_file, so_pin_file)
    if pin_file.exists() and database.exists():
        return token
    _write_secret(pin_file, secrets.token_hex(16))
    _write_secret(so_pin_file, secrets.token_hex(16))
    # The child reads the PINs from their files: only paths are in its argv.
    command = [sys.executable, "-m", "kustody.dev.tokens", "init", str(module)]
    command += [str(_KRYOPTIC_SLOT), label, str(so_pin_file), str(pin_file)]
    result = subprocess.run(
        command,
        env={**os.environ, **token.env},
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise UserError(f"could not initialise Kryoptic token {label!r}: {result.stderr.strip()}")
    return token


# -- token initialisation through the module's own C_InitToken (child process) ---------------

_CKF_RW_SERIAL = 0x6
_CKU_SO = 0
_UL = ctypes.c_ulong
_P = ctypes.c_void_p
_S = ctypes.c_char_p
# Index in CK_FUNCTION_LIST (after CK_VERSION) and signature of each function used here.
_FUNCTIONS = {
    "C_Initialize": (0, (_P,)),
    "C_Finalize": (1, (_P,)),
    "C_InitToken": (9, (_UL, _S, _UL, _S)),
    "C_InitPIN": (10, (_UL, _S, _UL)),
    "C_OpenSession": (12, (_UL, _UL, _P, _P, ctypes.POINTER(_UL))),
    "C_CloseSession": (13, (_UL,)),
    "C_Login": (18, (_UL, _UL, _S, _UL)),
    "C_Logout": (19, (_UL,)),
}


def _init_token(module: Path, slot: int, label: str, so_pin: bytes, user_pin: bytes) -> None:
    """C_InitToken, then as the SO C_InitPIN: what ``softhsm2-util --init-token`` does. Through
    C_GetFunctionList (Kryoptic exports no other C_ symbol)."""
    lib = ctypes.CDLL(str(module))
    get_list = lib.C_GetFunctionList
    get_list.restype = _UL
    table = _P()
    if get_list(ctypes.byref(table)) != 0 or not table.value:
        raise UserError("C_GetFunctionList failed")
    pointers = ctypes.cast(table.value + ctypes.sizeof(_P), ctypes.POINTER(_P))

    def call(name: str, *args: object) -> None:
        index, argtypes = _FUNCTIONS[name]
        fn = ctypes.CFUNCTYPE(_UL, *argtypes)(pointers[index])
        rv = fn(*args)
        if rv != 0:
            raise UserError(f"{name} failed: CKR 0x{rv:x}")

    call("C_Initialize", None)
    try:
        padded = label.encode().ljust(32, b" ")[:32]
        call("C_InitToken", slot, so_pin, len(so_pin), padded)
        session = _UL()
        call("C_OpenSession", slot, _CKF_RW_SERIAL, None, None, ctypes.byref(session))
        call("C_Login", session, _CKU_SO, so_pin, len(so_pin))
        call("C_InitPIN", session, user_pin, len(user_pin))
        call("C_Logout", session)
        call("C_CloseSession", session)
    finally:
        call("C_Finalize", None)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 6 or args[0] != "init":
        print("usage: python -m kustody.dev.tokens init MODULE SLOT LABEL SO_PIN_FILE PIN_FILE")
        return 2
    _, module, slot, label, so_pin_file, pin_file = args
    try:
        _init_token(
            Path(module),
            int(slot),
            label,
            Path(so_pin_file).read_bytes().rstrip(b"\n"),
            Path(pin_file).read_bytes().rstrip(b"\n"),
        )
    except UserError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
