"""Initialise the SoftHSM2 token once (the chart's init-token container).

softhsm2-util takes PINs only as command-line arguments, where /proc/PID/cmdline and exec
auditing show them. This does the same three PKCS#11 calls (C_InitToken with the SO PIN,
C_Login as SO, C_InitPIN with the user PIN) with both PINs read from files, so no PIN is
ever an argument or an environment variable. A token that already carries the label is left
as it is. Environment: PKCS11_MODULE, TOKEN_LABEL, PIN_DIR (files `user-pin`, `so-pin`),
SOFTHSM2_CONF.
"""

import ctypes
import os
import sys
from pathlib import Path

import pkcs11
from pkcs11 import TokenFlag


def read_pin(path: Path) -> str:
    text = path.read_bytes().decode("utf-8").removesuffix("\n").removesuffix("\r")
    if not text:
        sys.exit(f"init-token: {path} is empty")
    return text


def main() -> int:
    module, label = os.environ["PKCS11_MODULE"], os.environ["TOKEN_LABEL"]
    pin_dir = Path(os.environ.get("PIN_DIR", "/etc/kustody/pin"))
    lib = pkcs11.lib(module)
    if any(True for _ in lib.get_tokens(token_label=label)):
        print(f"SoftHSM2 token {label} is already initialised")
        return 0
    free = [
        s
        for s in lib.get_slots(token_present=True)
        if not s.get_token().flags & TokenFlag.TOKEN_INITIALIZED
    ]
    if not free:
        sys.exit("init-token: no free slot to initialise")
    slot = free[0]
    so_pin, user_pin = read_pin(pin_dir / "so-pin"), read_pin(pin_dir / "user-pin")
    # python-pkcs11 has no C_InitToken; the module is already initialised by pkcs11.lib.
    cdll = ctypes.CDLL(module)
    cdll.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    cdll.C_InitToken.restype = ctypes.c_ulong
    so = so_pin.encode()
    rv = cdll.C_InitToken(slot.slot_id, so, len(so), label.encode().ljust(32)[:32])
    if rv != 0:
        sys.exit(f"init-token: C_InitToken failed (CKR 0x{rv:x})")
    with slot.get_token().open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    print(f"SoftHSM2 token {label} initialised")
    return 0


if __name__ == "__main__":
    sys.exit(main())
