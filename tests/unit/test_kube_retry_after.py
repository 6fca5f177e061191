"""Kube honours Retry-After: waits, sends again, holds back the same kind, counts every 429."""

from __future__ import annotations

import asyncio
import email.utils
import time
from typing import Any

import pytest
from kustody.kube.api import RETRIES_AFTER_WAIT, Kube, TooManyRequests, parse_retry_after
from kustody.kube.errors import Unavailable
from kustody.kube.resources import DATAKEYS, LEASES


class _Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self._body = body

    def read(self) -> bytes:
        return self._body


class _FakeApi:
    """Answers from a script of (status, headers) per call, records when each was sent."""

    def __init__(self, script: list[tuple[int, dict[str, str]]]) -> None:
        self.script = script
        self.sent: list[tuple[float, str]] = []

    def param_serialize(self, method: str, path: str, **_: Any) -> tuple[Any, ...]:
        return method, path, {}, None, None

    def call_api(self, method: str, url: str, **_: Any) -> _Response:
        self.sent.append((time.monotonic(), url))
        status, headers = self.script.pop(0) if self.script else (200, {})
        body = b'{"reason": "TooManyRequests"}' if status >= 400 else b'{"ok": true}'
        return _Response(status, headers, body)


def _kube(script: list[tuple[int, dict[str, str]]]) -> tuple[Kube, _FakeApi, list[int]]:
    api = _FakeApi(script)
    codes: list[int] = []
    kube = Kube(api, workers=4, observe=lambda _v, _k, code, _s: codes.append(code))
    return kube, api, codes


def test_parse_retry_after() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 0 ") == 0.0
    assert parse_retry_after("-5") == 0.0
    assert parse_retry_after("100000") == 120.0  # capped
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    now = time.time()
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert 28 <= (parse_retry_after(date, now=now) or 0) <= 31


def test_429_waits_as_told_then_succeeds_and_is_counted() -> None:
    kube, api, codes = _kube([(429, {"Retry-After": "0.3"}), (200, {})])
    try:
        assert asyncio.run(kube.get(DATAKEYS, "a", "ns")) == {"ok": True}
    finally:
        kube.close()
    assert codes == [429, 200]
    assert api.sent[1][0] - api.sent[0][0] >= 0.3


def test_429_without_header_waits_one_second_by_default() -> None:
    kube, api, _ = _kube([(429, {}), (200, {})])
    try:
        asyncio.run(kube.get(DATAKEYS, "a", "ns"))
    finally:
        kube.close()
    assert api.sent[1][0] - api.sent[0][0] >= 1.0


def test_gives_up_with_the_servers_wait_after_the_retries() -> None:
    script = [(429, {"Retry-After": "0"})] * (RETRIES_AFTER_WAIT + 1)
    kube, api, codes = _kube(list(script))
    try:
        with pytest.raises(TooManyRequests) as caught:
            asyncio.run(kube.create(DATAKEYS, {}, "ns"))  # POST too: APF never executed it
    finally:
        kube.close()
    assert caught.value.retry_after == 0
    assert isinstance(caught.value, Unavailable)
    assert codes == [429] * (RETRIES_AFTER_WAIT + 1)
    assert len(api.sent) == RETRIES_AFTER_WAIT + 1


def test_a_wait_holds_back_the_same_kind_only() -> None:
    kube, api, _ = _kube([(429, {"Retry-After": "2"})])

    async def run() -> None:
        first = asyncio.ensure_future(kube.get(DATAKEYS, "a", "ns"))
        while kube.paused_for("DataKey") == 0:  # noqa: ASYNC110 - set on a pool thread
            await asyncio.sleep(0.01)
        await kube.get(LEASES, "lease", "ns")  # another kind: not held back
        await kube.get(DATAKEYS, "b", "ns")  # same kind: waits for the pause
        await first

    try:
        asyncio.run(run())
    finally:
        kube.close()
    refused_at = api.sent[0][0]
    lease = next(t for t, url in api.sent if "leases" in url)
    datakeys = sorted(t for t, url in api.sent if "datakeys" in url)
    assert lease - refused_at < 2.0  # sent during the pause
    assert all(t - refused_at >= 2.0 for t in datakeys[1:])  # none before it ended


def test_5xx_without_retry_after_is_not_retried() -> None:
    kube, api, codes = _kube([(503, {})])
    try:
        with pytest.raises(Unavailable) as caught:
            asyncio.run(kube.get(DATAKEYS, "a", "ns"))
    finally:
        kube.close()
    assert not isinstance(caught.value, TooManyRequests)
    assert codes == [503]
    assert len(api.sent) == 1
