"""The operator's work queue: dedupe, earliest-due wins, one worker per key, backoff.

The queue runs on a clock the test moves (no wall-clock sleeps, no timing assertions)."""

from __future__ import annotations

import asyncio

from kustody.controller.workqueue import WorkQueue


class Clock:
    """Monotonic seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _queue(**kwargs: float) -> tuple[WorkQueue[str], Clock]:
    clock = Clock()
    return WorkQueue(clock=clock, **kwargs), clock


def test_a_key_is_queued_once_and_the_earlier_due_time_wins() -> None:
    q, clock = _queue()
    q.add("a", delay=10)
    q.add("a", delay=0)  # earlier: replaces
    q.add("a", delay=5)  # later: ignored
    assert len(q) == 1
    assert q.pop() == "a"
    q.done("a")
    clock.advance(3600)
    assert q.pop() is None  # the superseded due times left nothing behind
    assert q.due_in() is None


def test_delayed_keys_come_out_in_due_order_when_the_clock_reaches_them() -> None:
    q, clock = _queue()
    q.add("late", delay=20)
    q.add("soon", delay=5)
    q.add("now")
    assert q.pop() == "now"
    assert q.pop() is None
    assert q.due_in() == 5
    clock.advance(4.9)
    assert q.pop() is None
    clock.advance(0.1)
    assert q.pop() == "soon"
    assert q.due_in() == 15
    clock.advance(15)
    assert q.pop() == "late"
    assert len(q) == 0


def test_a_key_added_while_processing_runs_again_after_done_never_concurrently() -> None:
    q, _clock = _queue()
    q.add("k")
    assert q.pop() == "k"
    q.add("k")  # an event arrives while a worker handles "k"
    assert q.pop() is None  # not handed to a second worker meanwhile
    assert len(q) == 0
    q.done("k")
    assert q.pop() == "k"


def test_a_delayed_add_while_processing_keeps_its_due_time() -> None:
    q, clock = _queue()
    q.add("k")
    assert q.pop() == "k"
    q.add("k", delay=10)
    clock.advance(4)
    q.done("k")  # still due 6 s from now, not 10
    assert q.due_in() == 6
    clock.advance(6)
    assert q.pop() == "k"


def test_retry_backs_off_exponentially_and_forget_resets() -> None:
    q, _clock = _queue(base_delay=0.5, max_delay=3.0)
    assert [q.retry("k") for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    assert q.failures("k") == 5
    q.forget("k")
    assert q.failures("k") == 0
    assert q.retry("k") == 0.5


def test_a_retried_key_waits_for_its_backoff() -> None:
    q, clock = _queue(base_delay=2)
    q.add("k")
    assert q.pop() == "k"
    q.done("k")
    q.retry("k")
    assert q.pop() is None
    clock.advance(2)
    assert q.pop() == "k"


def test_an_immediate_add_overrides_a_pending_backoff() -> None:
    """When the HSM comes back, everything is queued at once, not after its backoff."""
    q, _clock = _queue(base_delay=60)
    q.retry("k")
    assert q.pop() is None
    q.add("k")
    assert q.pop() == "k"


def test_get_returns_a_due_key_at_once() -> None:
    async def scenario() -> None:
        q, _clock = _queue()
        q.add("k")
        assert await q.get() == "k"

    asyncio.run(scenario())


def test_get_waits_for_the_clock_and_wakes_on_add() -> None:
    async def scenario() -> None:
        q, clock = _queue()
        q.add("later", delay=30)
        waiting = asyncio.create_task(q.get())
        for _ in range(5):
            await asyncio.sleep(0)  # let it run: it waits, nothing is due
        assert not waiting.done()
        clock.advance(30)
        q.wake()
        assert await waiting == "later"

        waiting = asyncio.create_task(q.get())
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        q.add("now")  # an add wakes a waiting worker
        assert await waiting == "now"

    asyncio.run(scenario())


def test_a_woken_get_keeps_waiting_while_nothing_is_due() -> None:
    async def scenario() -> None:
        q, clock = _queue()
        q.add("k", delay=10)
        waiting = asyncio.create_task(q.get())
        await asyncio.sleep(0)
        clock.advance(5)
        q.wake()
        for _ in range(5):
            await asyncio.sleep(0)
        assert not waiting.done()
        waiting.cancel()

    asyncio.run(scenario())
