"""A work queue with controller-runtime's semantics, for level-based reconcilers.

- A key is queued at most once; adding it again keeps the earlier due time.
- A key is processed by one worker at a time; a key added while it is processed runs again
  afterwards (nothing is lost, nothing runs twice at once).
- ``retry(key)`` requeues with exponential backoff per key; ``forget(key)`` resets it.

Due times come from ``clock`` (seconds, monotonic; ``time.monotonic`` by default). A test
passes a clock it moves itself (e.g. :class:`kustody.testing.fakes.ManualClock`'s
``monotonic``) and takes due keys with :meth:`WorkQueue.pop`, or calls :meth:`WorkQueue.wake`
after moving the clock so that a waiting :meth:`WorkQueue.get` looks again: no test has to
sleep for a delay to pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

MonotonicClock = Callable[[], float]
"""Seconds on a clock that never goes back (``time.monotonic``)."""


class WorkQueue(Generic[K]):
    def __init__(
        self,
        *,
        base_delay: float = 0.5,
        max_delay: float = 300.0,
        clock: MonotonicClock = time.monotonic,
    ) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}
        self._processing: set[K] = set()
        self._again: dict[K, float] = {}
        self._failures: dict[K, int] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._base = base_delay
        self._max = max_delay
        self._clock = clock

    def __len__(self) -> int:
        return len(self._due)

    def add(self, key: K, delay: float = 0.0) -> None:
        due = self._clock() + max(0.0, delay)
        if key in self._processing:
            self._again[key] = min(due, self._again.get(key, due))
            return
        current = self._due.get(key)
        if current is not None and current <= due:
            return
        self._due[key] = due
        heapq.heappush(self._heap, (due, next(self._seq), key))
        self._wake.set()

    def retry(self, key: K) -> float:
        """Requeue after this key's next backoff delay; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay = float(min(self._max, self._base * 2.0**failures))
        self.add(key, delay)
        return delay

    def forget(self, key: K) -> None:
        self._failures.pop(key, None)

    def failures(self, key: K) -> int:
        return self._failures.get(key, 0)

    def due_in(self) -> float | None:
        """Seconds until the earliest queued key is due (0.0: one is due now; None: empty)."""
        self._drop_superseded()
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self._clock())

    def pop(self) -> K | None:
        """The next key that is due now, without waiting (None if none is); as with
        :meth:`get`, the caller must call ``done(key)`` when finished."""
        self._drop_superseded()
        if not self._heap or self._heap[0][0] > self._clock():
            return None
        _, _, key = heapq.heappop(self._heap)
        del self._due[key]
        self._processing.add(key)
        return key

    def wake(self) -> None:
        """Make waiting :meth:`get` calls look at the clock again (after a test moved it)."""
        self._wake.set()

    async def get(self) -> K:
        """The next due key; the caller must call ``done(key)`` when finished."""
        while True:
            key = self.pop()
            if key is not None:
                return key
            self._wake.clear()
            timeout = self.due_in()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout)

    def done(self, key: K) -> None:
        self._processing.discard(key)
        again = self._again.pop(key, None)
        if again is not None:
            self.add(key, max(0.0, again - self._clock()))

    def _drop_superseded(self) -> None:
        """Heap entries whose key was added again with an earlier due time since."""
        while self._heap:
            due, _, key = self._heap[0]
            if self._due.get(key) == due:
                return
            heapq.heappop(self._heap)
