"""Concurrent decrypts share one worker request (keyservice._Coalescer): a caller that
gives up must not leave that request's bookkeeping behind, or every later decrypt of the
sidecar waits for ever (found by the unwrap audit work, issue 9)."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

from kustody.api.token import TokenConfig
from kustody.domain.aad import Binding
from kustody.domain.envelope import Envelope
from kustody.sidecar.keyservice import GenerateRequest

from .conftest import run, running_sidecar


def test_a_cancelled_decrypt_never_blocks_the_ones_after_it(
    tmp_path: Path, token_config: TokenConfig, ring: str
) -> None:
    async def main() -> None:
        async with running_sidecar(tmp_path, token_config) as sidecar:
            service = sidecar.service
            await service.create_key_version(ring, 1)
            binding = Binding("ns", "dk", {})
            key = await service.generate_data_key(
                GenerateRequest(ring, binding, include_plaintext=True)
            )
            envelope = Envelope.from_text(key.envelope.to_text())
            worker = sidecar.connection._worker
            assert worker is not None
            pid = worker.process.pid
            os.kill(pid, signal.SIGSTOP)  # the worker is busy: the decrypt stays in flight
            try:
                pending = asyncio.ensure_future(service.decrypt(envelope, binding))
                await asyncio.sleep(0.3)
                pending.cancel()  # its only caller gives up (a deadline, a client gone)
                await asyncio.gather(pending, return_exceptions=True)
            finally:
                os.kill(pid, signal.SIGCONT)
            for _ in range(3):
                plaintext = await asyncio.wait_for(service.decrypt(envelope, binding), 10)
                assert plaintext == key.plaintext

    run(main())
