"""The operator's work queue: dedupe, earliest-due wins, one worker per key, backoff."""

from __future__ import annotations

import asyncio

import pytest
from kustody.controller.workqueue import WorkQueue


async def _get(q: WorkQueue[str], within: float = 1.0) -> str:
    return await asyncio.wait_for(q.get(), within)


def test_a_key_is_queued_once_and_the_earlier_due_time_wins() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("a", delay=10)
        q.add("a", delay=0)  # earlier: replaces
        q.add("a", delay=5)  # later: ignored
        assert len(q) == 1
        assert await _get(q) == "a"
        with pytest.raises(TimeoutError):
            await _get(q, 0.2)

    asyncio.run(scenario())


def test_delayed_keys_come_out_in_due_order() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("late", delay=0.2)
        q.add("soon", delay=0.05)
        q.add("now")
        assert [await _get(q), await _get(q), await _get(q)] == ["now", "soon", "late"]

    asyncio.run(scenario())


def test_a_key_added_while_processing_runs_again_after_done_never_concurrently() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue()
        q.add("k")
        assert await _get(q) == "k"
        q.add("k")  # an event arrives while a worker handles "k"
        with pytest.raises(TimeoutError):
            await _get(q, 0.1)  # not handed to a second worker meanwhile
        q.done("k")
        assert await _get(q) == "k"

    asyncio.run(scenario())


def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=0.5, max_delay=3.0)
        assert [q.retry("k") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
        assert q.failures("k") == 5
        q.forget("k")
        assert q.failures("k") == 0
        assert q.retry("k") == 0.5

    asyncio.run(scenario())


def test_an_immediate_add_overrides_a_pending_backoff() -> None:
    """When the HSM comes back, everything is queued at once, not after its backoff."""

    async def scenario() -> None:
        q: WorkQueue[str] = WorkQueue(base_delay=60)
        q.retry("k")
        q.add("k")
        assert await _get(q, 0.5) == "k"

    asyncio.run(scenario())
