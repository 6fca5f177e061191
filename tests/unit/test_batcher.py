"""Concurrent single calls travel as one batch; each caller gets its own result or error."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
from kustody.controller.batcher import Batcher


def test_concurrent_calls_share_batches_and_results_line_up() -> None:
    sent: list[list[int]] = []

    async def send(items: Sequence[int]) -> list[int | BaseException]:
        sent.append(list(items))
        return [i * 10 if i != 7 else ValueError("seven") for i in items]

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(send, max_batch=4, max_delay=0.01)
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(10)), return_exceptions=True
        )
        assert results[:7] == [0, 10, 20, 30, 40, 50, 60]
        assert isinstance(results[7], ValueError)
        assert results[8:] == [80, 90]

    asyncio.run(scenario())
    assert [len(b) for b in sent] == [4, 4, 2]  # full batches flush at once, the rest on time
    assert sorted(i for b in sent for i in b) == list(range(10))


def test_a_failed_batch_fails_every_caller_with_the_reason() -> None:
    async def send(items: Sequence[int]) -> list[int | BaseException]:
        raise ConnectionError("sidecar gone")

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(send, max_batch=10, max_delay=0.01)
        results = await asyncio.gather(
            *(batcher.submit(i) for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ConnectionError) for r in results)

    asyncio.run(scenario())


def test_a_lone_call_is_sent_after_the_delay() -> None:
    async def send(items: Sequence[int]) -> list[int | BaseException]:
        return list(items)

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(send, max_batch=100, max_delay=0.01)
        assert await asyncio.wait_for(batcher.submit(5), 1.0) == 5

    asyncio.run(scenario())


@pytest.mark.parametrize("n", [1, 100, 250])
def test_no_item_is_lost_whatever_the_count(n: int) -> None:
    async def send(items: Sequence[int]) -> list[int | BaseException]:
        await asyncio.sleep(0)
        return [i + 1 for i in items]

    async def scenario() -> None:
        batcher: Batcher[int, int] = Batcher(send, max_batch=100, max_delay=0.001)
        assert await asyncio.gather(*(batcher.submit(i) for i in range(n))) == [
            i + 1 for i in range(n)
        ]

    asyncio.run(scenario())
