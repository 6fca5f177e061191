"""Fixtures for tests against a real token: SoftHSM2, or Kryoptic with
``KUSTODY_TEST_TOKEN=kryoptic`` (``make test`` runs this layer on both; see kustody.dev.tokens).

The in-process fixtures share one token per test session: SoftHSM2 reads SOFTHSM2_CONF (and
Kryoptic KRYOPTIC_CONF) once, when the library is initialised. Tests that need their own token
(wrong PIN, token gone) run the sidecar as a subprocess with its own environment.
``KUSTODY_HSM_GCM_IV=token`` runs the in-process sidecars (and, through the environment, the
subprocess ones) with token-generated GCM IVs only (the FIPS-style profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kustody.api.token import TokenConfig
from kustody.dev.processes import accepts_unix
from kustody.dev.tokens import DevToken, create_token, selected_kind
from kustody.sidecar.connection import HsmConnection
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.server import Sidecar, SidecarConfig

T = TypeVar("T")
_rings = itertools.count(1)


def softhsm2_only(why: str) -> pytest.MarkDecorator:
    """Skip a test that relies on SoftHSM2 internals when another implementation is tested."""
    return pytest.mark.skipif(
        selected_kind() != "softhsm2", reason=f"SoftHSM2 only ({selected_kind()}): {why}"
    )


@pytest.fixture(scope="session")
def hsm_token(tmp_path_factory: pytest.TempPathFactory) -> DevToken:
    token = create_token(tmp_path_factory.mktemp("token"), "kustody-test")
    os.environ.update(token.env)
    return token


@pytest.fixture(scope="session")
def token_config(hsm_token: DevToken) -> TokenConfig:
    return TokenConfig(
        hsm_token.module,
        hsm_token.label,
        hsm_token.pin_file,
        gcm_iv=os.environ.get("KUSTODY_HSM_GCM_IV", "auto"),
    )


@pytest.fixture(scope="session")
def connection(token_config: TokenConfig) -> Iterator[HsmConnection]:
    # No waiting period between scheduling a destruction and destroying (tests of the
    # waiting period itself start sidecars of their own).
    conn = HsmConnection(token_config, min_destroy_delay=0)
    health = asyncio.run(conn.start())
    assert health.serving, health
    yield conn
    asyncio.run(conn.close())


@pytest.fixture(scope="session")
def key_service(connection: HsmConnection) -> KeyService:
    return KeyService(connection)


@pytest.fixture
def ring() -> str:
    """A KeyRing name no other test uses."""
    return f"ring-{os.getpid()}-{next(_rings)}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.hsm)


@contextlib.asynccontextmanager
async def running_sidecar(
    directory: Path, token: TokenConfig, **options: Any
) -> AsyncIterator[Sidecar]:
    """An in-process sidecar on unix sockets in ``directory`` (no destruction waiting period
    unless ``min_destroy_delay`` is given)."""
    options.setdefault("min_destroy_delay", 0.0)
    config = SidecarConfig(token=token, socket=directory / "hsm.sock", **options)
    sidecar = Sidecar(config)
    await sidecar.start()
    try:
        yield sidecar
    finally:
        await sidecar.stop(grace=0)


@dataclass
class SidecarProcess:
    """``kustody hsm`` as a subprocess; its whole log goes to ``log``."""

    process: subprocess.Popen[bytes]
    socket: Path
    log: Path

    def stop(self) -> str:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.log.read_text()


def start_process(
    directory: Path,
    token: DevToken,
    *args: str,
    pin_file: Path | None = None,
    preexec_fn: Callable[[], None] | None = None,
    prefix: tuple[str, ...] = (),
) -> SidecarProcess:
    """``kustody hsm`` on ``token``, with no destruction waiting period unless ``args`` give
    ``--min-destroy-delay`` (the last one wins)."""
    socket = directory / "proc.sock"
    log = directory / "sidecar.log"
    env = {**os.environ, **token.env, "KUSTODY_HSM_PIN_FILE": str(pin_file or token.pin_file)}
    command = [
        *prefix, sys.executable, "-m", "kustody", "hsm", "--module", str(token.module),
        "--token-label", token.label, "--socket", str(socket), "--health-interval", "0.2",
        "--log-level", "DEBUG", "--min-destroy-delay", "0s", *args,
    ]  # fmt: skip
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
        )
    # Serving, not just bound: gRPC creates the socket file before it listens, and a busy
    # machine can keep a connect in that gap refused.
    deadline = time.monotonic() + 60
    while not accepts_unix(socket):
        if process.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sidecar did not start:\n{log.read_text()}")
        time.sleep(0.05)
    return SidecarProcess(process, socket, log)
