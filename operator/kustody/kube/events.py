"""Kubernetes Events for custom resources, deduplicated so a retried failure is not spam."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

from kustody.kube.api import Kube
from kustody.kube.errors import KubeError
from kustody.kube.resources import EVENTS

log = logging.getLogger(__name__)
_COMPONENT = "kustody-operator"


class EventRecorder:
    """Posts core/v1 Events; the same (object, reason, message) at most once per ``window``."""

    def __init__(self, kube: Kube, *, window: float = 300.0) -> None:
        self._kube = kube
        self._window = window
        self._recent: dict[tuple[str, str, str], float] = {}
        self._instance = os.environ.get("POD_NAME") or socket.gethostname()

    async def normal(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self._post(obj, "Normal", reason, message)

    async def warning(self, obj: Mapping[str, Any], reason: str, message: str) -> None:
        await self._post(obj, "Warning", reason, message)

    async def _post(self, obj: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid", ""))
        now = time.monotonic()
        key = (uid, reason, message)
        if now - self._recent.get(key, -1e9) < self._window:
            return
        self._recent[key] = now
        if len(self._recent) > 10_000:
            cutoff = now - self._window
            self._recent = {k: t for k, t in self._recent.items() if t > cutoff}
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
