"""What a DataKey allows: its KeyRing and ``spec.consumers``, read from the API and cached
for a few seconds (a consumer removed or a DataKey deleted is refused within ``ttl``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

# (namespace, name) -> the DataKey object, or None when it does not exist
Fetch = Callable[[str, str], Awaitable[Mapping[str, Any] | None]]


@dataclass(frozen=True)
class DataKeyGrant:
    key_ring: str
    consumers: frozenset[str]


def grant_from(obj: Mapping[str, Any]) -> DataKeyGrant:
    spec = obj.get("spec") or {}
    ring = str((spec.get("keyRingRef") or {}).get("name") or "")
    consumers = spec.get("consumers") or []
    return DataKeyGrant(ring, frozenset(str(c) for c in consumers))


class DataKeyDirectory:
    """``grant(namespace, name)``: the DataKey's grant or None (deleted/never existed).
    Found DataKeys are cached ``ttl`` seconds, missing ones ``negative_ttl``; concurrent
    lookups of one DataKey share one GET."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        ttl: float = 5.0,
        negative_ttl: float = 2.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, DataKeyGrant | None]] = {}
        self._pending: dict[tuple[str, str], asyncio.Future[DataKeyGrant | None]] = {}

    async def grant(self, namespace: str, name: str) -> DataKeyGrant | None:
        key = (namespace, name)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            return cached[1]
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[DataKeyGrant | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            obj = await self._fetch(namespace, name)
            grant = None if obj is None else grant_from(obj)
            ttl = self.ttl if grant is not None else self.negative_ttl
            if len(self._cache) >= self._max_entries:
                self._cache.clear()
            self._cache[key] = (self._clock() + ttl, grant)
            future.set_result(grant)
            return grant
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()
            raise
        finally:
            del self._pending[key]
