"""Faults against the real `kustody hsm` process: each is typed, Health says why, it keeps serving.

Each test uses its own token (SoftHSM2 reads its config once per process).
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from kustody.api.client import GenerateItem, HsmClient
from kustody.api.errors import HsmError, Reason
from kustody.dev.tokens import DevToken, create_token
from kustody.domain.aad import Binding
from kustody.domain.keyversion import VersionState

from .conftest import run, softhsm2_only, start_process

BINDING = Binding("shop", "db-key", {"app": "db"})


@pytest.fixture
def own_token(tmp_path: Path) -> DevToken:
    return create_token(tmp_path / "token", "fault-test")


async def _until(check: Callable[[], Awaitable[bool]], within: float = 15) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.1)


async def _reason(coro: Awaitable[object]) -> Reason:
    with pytest.raises(HsmError) as info:
        await coro
    return info.value.reason


def test_wrong_pin_is_reported_and_fixed_by_changing_the_pin_file(
    tmp_path: Path, own_token: DevToken
) -> None:
    pin_file = tmp_path / "wrong.pin"
    pin_file.write_text("not-the-pin\n")
    proc = start_process(tmp_path, own_token, pin_file=pin_file)

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            health = await hsm.health()
            assert not health.serving
            assert health.reason == "PIN_INCORRECT"
            assert await _reason(hsm.create_key_version("r", 1)) is Reason.TOKEN_UNAVAILABLE
            pin_file.write_text(own_token.pin_file.read_text())

            async def serving() -> bool:
                return (await hsm.health()).serving

            await _until(serving)
            assert (await hsm.create_key_version("r", 1)).ref.version == 1

    try:
        run(main())
    finally:
        log = proc.stop()
    assert "not-the-pin" not in log
    assert own_token.pin_file.read_text() not in log
    assert "PIN is not accepted" in log


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (("--module", "/nonexistent/libpkcs11.so"), "MODULE_UNAVAILABLE"),
        (("--token-label", "no-such-token"), "TOKEN_NOT_FOUND"),
    ],
)
def test_missing_module_or_token(
    tmp_path: Path, own_token: DevToken, args: tuple[str, ...], reason: str
) -> None:
    proc = start_process(tmp_path, own_token, *args)

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            health = await hsm.health()
            assert not health.serving
            assert health.reason == reason
            assert await _reason(hsm.describe_key("r")) is Reason.TOKEN_UNAVAILABLE
            assert not (await hsm.health()).serving  # still answering

    try:
        run(main())
    finally:
        proc.stop()


@softhsm2_only("moves SoftHSM2's token directory away; a Kryoptic token is one open sqlite file")
def test_token_gone_mid_run_and_back(tmp_path: Path, own_token: DevToken) -> None:
    proc = start_process(tmp_path, own_token)
    token_dir = next((own_token.directory / "tokens").iterdir())
    parked = tmp_path / "parked"

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            await hsm.create_key_version("r", 1)
            key = await hsm.generate_data_key("r", BINDING)
            shutil.move(token_dir, parked)
            assert await _reason(hsm.generate_data_key("r", BINDING)) is (Reason.TOKEN_UNAVAILABLE)
            # While it is gone, nothing is created anywhere and Health says why.
            assert await _reason(hsm.create_key_version("r", 2)) is Reason.TOKEN_UNAVAILABLE
            health = await hsm.health()
            assert not health.serving
            assert health.reason in {"TOKEN_LOST", "TOKEN_NOT_FOUND"}
            shutil.move(parked, token_dir)

            async def serving() -> bool:
                return (await hsm.health()).serving

            await _until(serving)
            got = await hsm.rewrap(key.wrapped, BINDING)
            assert got.to_version == 1
            description = await hsm.describe_key("r")
            assert [v.ref.version for v in description.versions] == [1]

    try:
        run(main())
    finally:
        proc.stop()


def test_logs_of_a_full_run_hold_no_dek_or_pin(tmp_path: Path, own_token: DevToken) -> None:
    proc = start_process(tmp_path, own_token)
    secrets: list[bytes] = []

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:
            await hsm.create_key_version("logs", 1)
            for i in range(20):
                binding = Binding("ns", f"dk{i}", {"ctx": str(i)})
                key = await hsm.generate_data_key(
                    "logs", binding, return_plaintext=True, allow_plaintext_export=True
                )
                assert key.plaintext is not None
                secrets.append(key.plaintext)
                assert await hsm.decrypt(key.wrapped, binding, allow_plaintext_export=True)
                await _reason(
                    hsm.decrypt(key.wrapped, Binding("x", "y"), allow_plaintext_export=True)
                )
            await hsm.create_key_version("logs", 2)
            batch = await hsm.batch_generate_data_keys(
                [GenerateItem("logs", BINDING, return_plaintext=True, allow_plaintext_export=True)]
                * 20
            )
            for item in batch:
                assert not isinstance(item, HsmError)
                assert item.plaintext is not None
                secrets.append(item.plaintext)
            await hsm.batch_rewrap(
                [(b.wrapped, BINDING) for b in batch if not isinstance(b, HsmError)]
            )
            await _reason(hsm.decrypt("kustody:v1:AAAA", BINDING, allow_plaintext_export=True))
            await _reason(hsm.generate_data_key("logs", BINDING, return_plaintext=True))
            await _reason(hsm.destroy_version("logs", 1))

    try:
        run(main())
    finally:
        log = proc.stop()
    assert "created KEK version logs/v1" in log  # the log was captured
    pin = own_token.pin_file.read_text()
    forms = [pin]
    for dek in secrets:
        forms += [dek.hex(), dek.hex().upper(), base64.b64encode(dek).decode(), repr(dek)[2:-1]]
        forms += [dek.hex()[:16]]
    leaked = [f for f in forms if f in log]
    assert leaked == []
    assert all(dek not in log.encode("utf-8", "surrogateescape") for dek in secrets)


def test_request_faults_are_typed_and_the_process_keeps_serving(
    tmp_path: Path, own_token: DevToken
) -> None:
    """Wrong AAD, unknown and destroyed versions, oversized requests, per-item batch errors:
    against the real process, each is typed; Health stays SERVING (the fault is the
    request's, not the token's) and the next good call works."""
    proc = start_process(tmp_path, own_token)

    async def main() -> None:
        async with HsmClient.unix(proc.socket) as hsm:

            async def still_serving() -> None:
                health = await hsm.health()
                assert health.serving, health
                assert (await hsm.generate_data_key("r", BINDING)).version >= 1

            await hsm.create_key_version("r", 1)
            key = await hsm.generate_data_key("r", BINDING)
            elsewhere = Binding("other-ns", "db-key", {"app": "db"})
            checks: list[tuple[Awaitable[object], Reason]] = [
                (hsm.rewrap(key.wrapped, elsewhere), Reason.AAD_MISMATCH),
                (hsm.generate_data_key("r", BINDING, version=7), Reason.VERSION_NOT_FOUND),
                (hsm.generate_data_key("nope", BINDING), Reason.NO_PRIMARY_VERSION),
                (hsm.batch_generate_data_keys([GenerateItem("r", BINDING)] * 1001),
                 Reason.REQUEST_TOO_LARGE),
                (hsm.decrypt("kustody:v1:" + "A" * 5_000_000, BINDING,
                             allow_plaintext_export=True), Reason.REQUEST_TOO_LARGE),
                (hsm.rewrap("kustody:v1:AAAA", BINDING), Reason.MALFORMED_ENVELOPE),
            ]  # fmt: skip
            for call, reason in checks:
                assert await _reason(call) is reason
                await still_serving()

            # Destroyed version: v1 disabled and destroyed; v2 is the primary.
            await hsm.create_key_version("r", 2)
            old = await hsm.generate_data_key("r", BINDING, version=1)
            await hsm.set_version_state("r", 1, VersionState.DESTROY_SCHEDULED)
            await hsm.destroy_version("r", 1)
            assert await _reason(hsm.rewrap(old.wrapped, BINDING)) is Reason.VERSION_DESTROYED
            assert await _reason(hsm.create_key_version("r", 1)) is Reason.VERSION_DESTROYED
            await still_serving()

            # In a batch, bad items fail alone and good ones succeed.
            results = await hsm.batch_rewrap(
                [(old.wrapped, BINDING), (key.wrapped, BINDING), ("junk", BINDING)]
            )
            assert isinstance(results[0], HsmError)
            assert results[0].reason is Reason.VERSION_DESTROYED
            assert isinstance(results[1], HsmError)  # key was under v1 too
            assert isinstance(results[2], HsmError)
            assert results[2].reason is Reason.MALFORMED_ENVELOPE
            fresh = await hsm.generate_data_key("r", BINDING)
            mixed = await hsm.batch_rewrap([(fresh.wrapped, BINDING), (fresh.wrapped, elsewhere)])
            assert not isinstance(mixed[0], HsmError)
            assert mixed[0].to_version == 2
            assert isinstance(mixed[1], HsmError)
            assert mixed[1].reason is Reason.AAD_MISMATCH
            await still_serving()

    try:
        run(main())
        assert proc.process.poll() is None  # alive after all of it
    finally:
        log = proc.stop()
    # Each refusal is logged with its reason (the client maps gRPC's own size limit itself).
    for reason in ("AAD_MISMATCH", "VERSION_NOT_FOUND", "VERSION_DESTROYED", "MALFORMED_ENVELOPE"):
        assert reason in log, reason
