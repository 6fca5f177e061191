"""The one thread per process that makes PKCS#11 calls.

python-pkcs11 calls ``C_Initialize(NULL)`` (no locking callbacks) and releases the GIL inside
every call, so two threads calling into SoftHSM2 at once crash the process. Every PKCS#11 call
in Kustody runs on this thread; work queued from asyncio waits its turn.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_ident: int | None = None


def _mark() -> None:
    global _ident
    _ident = threading.get_ident()


def _get() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="pkcs11", initializer=_mark
            )
        return _executor


async def run(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the PKCS#11 thread and await its result."""
    return await asyncio.get_running_loop().run_in_executor(_get(), fn)


def call(fn: Callable[[], T]) -> T:
    """Run ``fn`` on the PKCS#11 thread and block for its result (for non-async callers)."""
    if on_thread():
        return fn()
    return _get().submit(fn).result()


def on_thread() -> bool:
    return _ident is not None and threading.get_ident() == _ident


def assert_on_thread() -> None:
    if not on_thread():
        raise RuntimeError("PKCS#11 call outside the PKCS#11 thread")
