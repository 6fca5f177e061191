"""Token buckets per identity (kustody.sidecar.unwrap.ratelimit) with a fake clock."""

from __future__ import annotations

import pytest
from kustody.sidecar.unwrap.ratelimit import RateLimiter


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_burst_then_rate_per_identity() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=10, burst=5, clock=clock)
    assert [limiter.allow("a/x") for _ in range(6)] == [True] * 5 + [False]
    assert limiter.allow("b/x")  # another identity has its own bucket
    clock.now += 0.1  # one token back
    assert limiter.allow("a/x")
    assert not limiter.allow("a/x")
    clock.now += 100  # refills up to the burst, not beyond
    assert sum(limiter.allow("a/x") for _ in range(10)) == 5


def test_buckets_are_bounded() -> None:
    limiter = RateLimiter(rate=1, burst=1, max_keys=3, clock=Clock())
    for key in "abcd":
        assert limiter.allow(key)
    assert limiter.allow("a")  # dropped (least recently used), so it starts full again
    assert len(limiter._buckets) == 3


def test_nonsense_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rate"):
        RateLimiter(rate=0, burst=1)
