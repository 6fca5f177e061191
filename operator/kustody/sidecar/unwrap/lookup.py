"""A small read-through cache for API objects the unwrap service consults on every call
(DataKeys, KeyRings, Namespaces): found objects are kept ``ttl`` seconds, missing ones
``negative_ttl``; concurrent lookups of one key share one GET; memory is bounded."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CachedLookup(Generic[K, V]):
    """``await lookup.get(key)``: ``load(key)`` (None when the object does not exist), cached.

    Exceptions from ``load`` (API unreachable) are not cached. When ``max_entries`` is
    reached, expired entries are dropped first, then the oldest ones.
    """

    def __init__(
        self,
        load: Callable[[K], Awaitable[V | None]],
        *,
        ttl: float,
        negative_ttl: float,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._load = load
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[K, tuple[float, V | None]] = {}
        self._pending: dict[K, asyncio.Future[V | None]] = {}
        self.loads = 0  # calls of ``load`` (for tests)

    async def get(self, key: K) -> V | None:
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[V | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            self.loads += 1
            value = await self._load(key)
            self._store(key, value)
            future.set_result(value)
            return value
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            del self._pending[key]

    def _store(self, key: K, value: V | None) -> None:
        now = self._clock()
        if key not in self._cache and len(self._cache) >= self._max_entries:
            for old in [k for k, (e, _) in self._cache.items() if e <= now]:
                del self._cache[old]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache.pop(key, None)
        self._cache[key] = (now + (self.ttl if value is not None else self.negative_ttl), value)
