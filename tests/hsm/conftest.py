"""Fixtures for tests against a real SoftHSM2 token.

The in-process fixtures share one token per test session: SoftHSM2 reads SOFTHSM2_CONF once,
when the library is initialised. Tests that need their own token (wrong PIN, token gone) run
the sidecar as a subprocess with its own environment.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kustody.dev.softhsm import SoftHSMToken, create_token
from kustody.hsm.connection import HsmConnection
from kustody.hsm.keyservice import KeyService
from kustody.hsm.token import TokenConfig

T = TypeVar("T")
_rings = itertools.count(1)


@pytest.fixture(scope="session")
def hsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHSMToken:
    token = create_token(tmp_path_factory.mktemp("softhsm"), "kustody-test")
    os.environ.update(token.env)
    return token


@pytest.fixture(scope="session")
def token_config(hsm_token: SoftHSMToken) -> TokenConfig:
    return TokenConfig(hsm_token.module, hsm_token.label, hsm_token.pin_file)


@pytest.fixture(scope="session")
def connection(token_config: TokenConfig) -> Iterator[HsmConnection]:
    conn = HsmConnection(token_config)
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
