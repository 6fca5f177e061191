"""kube/events.py: Events deduplicated per (object, reason, message) within a window, with a
bounded memory whose cost per post does not grow with the number of objects."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from kustody.kube.api import Kube
from kustody.kube.events import EventRecorder


class _Kube:
    def __init__(self) -> None:
        self.posted: list[dict[str, Any]] = []

    async def create(self, resource: Any, body: dict[str, Any], namespace: str) -> None:
        self.posted.append(body)


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _obj(i: int) -> dict[str, Any]:
    return {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "DataKey",
        "metadata": {"name": f"dk-{i}", "namespace": "shop", "uid": f"uid-{i}"},
    }


def _recorder(limit: int = 100) -> tuple[EventRecorder, _Kube, _Clock]:
    kube, clock = _Kube(), _Clock()
    recorder = EventRecorder(cast(Kube, kube), window=300.0, limit=limit, clock=clock)
    return recorder, kube, clock


def test_the_same_event_is_posted_once_per_window() -> None:
    recorder, kube, clock = _recorder()

    async def main() -> None:
        await recorder.normal(_obj(1), "Created", "DEK generated")
        await recorder.normal(_obj(1), "Created", "DEK generated")
        await recorder.warning(_obj(1), "Failed", "token unavailable")
        await recorder.normal(_obj(2), "Created", "DEK generated")
        clock.now += 299
        await recorder.normal(_obj(1), "Created", "DEK generated")
        clock.now += 2
        await recorder.normal(_obj(1), "Created", "DEK generated")

    asyncio.run(main())
    assert [(b["involvedObject"]["name"], b["reason"], b["type"]) for b in kube.posted] == [
        ("dk-1", "Created", "Normal"),
        ("dk-1", "Failed", "Warning"),
        ("dk-2", "Created", "Normal"),
        ("dk-1", "Created", "Normal"),
    ]
    assert kube.posted[0]["involvedObject"]["uid"] == "uid-1"
    assert kube.posted[0]["metadata"] == {"generateName": "dk-1.", "namespace": "shop"}


def test_memory_is_bounded_and_keeps_the_newest_keys() -> None:
    """More distinct events inside one window than the limit (a rotation of 10,000 DataKeys
    posts 10,000): the table never exceeds the limit, the newest keys are still deduplicated
    and only the oldest are forgotten."""
    recorder, kube, clock = _recorder(limit=100)

    async def main() -> None:
        for i in range(250):
            clock.now += 0.01
            await recorder.normal(_obj(i), "Rewrapped", "re-wrapped under v2")
            assert len(recorder._recent) <= 100
        posted = len(kube.posted)
        for i in range(150, 250):  # the newest 100: remembered
            await recorder.normal(_obj(i), "Rewrapped", "re-wrapped under v2")
        assert len(kube.posted) == posted
        await recorder.normal(_obj(0), "Rewrapped", "re-wrapped under v2")  # evicted: again
        assert len(kube.posted) == posted + 1

    asyncio.run(main())
    assert len(kube.posted) == 251


def test_expired_keys_are_dropped_from_the_front() -> None:
    recorder, kube, clock = _recorder(limit=1000)

    async def main() -> None:
        for i in range(10):
            await recorder.normal(_obj(i), "Created", "DEK generated")
        clock.now += 301
        await recorder.normal(_obj(99), "Created", "DEK generated")

    asyncio.run(main())
    assert list(recorder._recent) == [("uid-99", "Created", "DEK generated")]
    assert len(kube.posted) == 11
