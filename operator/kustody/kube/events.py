"""Kubernetes Events for custom resources, deduplicated so a retried failure is not spam."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

from kustody.kube.api import Kube
from kustody.kube.errors import KubeError
from kustody.kube.resources import EVENTS

log = logging.getLogger(__name__)
_COMPONENT = "kustody-operator"


# How many recent (object, reason, message) keys are remembered for deduplication.
RECENT_LIMIT = 10_000


class EventRecorder:
    """Posts core/v1 Events; the same (object, reason, message) at most once per ``window``.

    The recent keys are kept oldest first: expired ones are dropped from the front, and beyond
    ``limit`` the oldest go even inside the window (at worst one Event more). Each post costs
    the same whatever the number of objects: at 10,000 DataKeys a rotation posts 10,000
    ``Rewrapped`` Events inside one window, and rebuilding the table on every post (as this
    once did) took 60 % of the operator's CPU for that rotation."""

    def __init__(
        self,
        kube: Kube,
        *,
        window: float = 300.0,
        limit: int = RECENT_LIMIT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._kube = kube
        self._window = window
        self._limit = limit
        self._clock = clock
        self._recent: OrderedDict[tuple[str, str, str], float] = OrderedDict()
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()

    def _first_in_window(self, key: tuple[str, str, str]) -> bool:
        """Whether ``key`` was not posted within the window; remembers it as posted now."""
        now = self._clock()
        recent = self._recent
        while recent:
            oldest, when = next(iter(recent.items()))
            if now - when < self._window and len(recent) < self._limit:
                break
            if oldest == key and now - when < self._window:
                break  # the key itself is the oldest and still fresh: keep it
            del recent[oldest]
        last = recent.get(key)
        if last is not None and now - last < self._window:
            return False
        recent[key] = now
        recent.move_to_end(key)
        return True

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self._post(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self._post(obj, "Warning", reason, message)

    async def _post(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        if not self._first_in_window((uid, reason, message)):
            return
        namespace = meta.get("namespace") or "default"
        stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "metadata": {"generateName": f"{meta.get('name', 'object')}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta.get("name"),
                "namespace": meta.get("namespace"),
                "uid": uid,
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": _COMPONENT},
            "reportingComponent": f"kustody.io/{_COMPONENT}",
            "reportingInstance": self._instance,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            await self._kube.create(EVENTS, body, namespace)
        except KubeError as exc:  # an Event is best effort; never fail a reconcile for it
            log.warning("could not post event %s on %s: %s", reason, meta.get("name"), exc)
