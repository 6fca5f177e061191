"""The one thread that makes PKCS#11 calls: the main thread of the worker process.

python-pkcs11 calls ``C_Initialize(NULL)`` (no locking callbacks) and releases the GIL inside
every call, so two threads calling into SoftHSM2 at once crash the process. Every PKCS#11 call
in Kustody runs in the worker process (:mod:`kustody.pkcs11.worker`), on the thread that marked
itself here; token code asserts it. The sidecar's front end never loads the module.
"""

from __future__ import annotations

import threading

_ident: int | None = None


def mark_current() -> None:
    """Make the calling thread the process's PKCS#11 thread."""
    global _ident
    _ident = threading.get_ident()


def on_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def assert_on_thread() -> None:
    if not on_thread():
        raise RuntimeError("PKCS#11 call outside the PKCS#11 thread")
