"""An informer: LIST then WATCH of one kind, whole objects or metadata only.

Metadata only for Secrets: anyone who may create Secrets can make them carry Kustody's
labels, and their data (up to 1 MiB each) must never reach the operator's memory. Only
metadata crosses the wire; a reconciler that needs an owned Secret's data GETs that one
Secret. Whole objects for DataKeys, the kind there are most of: each event costs a JSON
decode and a handler call (Kopf's event machinery costs several times that per event).

The watch resumes from the last resourceVersion it saw (bookmarks keep it fresh); when the
API server answers 410 Gone (the version was compacted away) it lists again and reports the
full set of objects, so a consumer can forget what disappeared while it was not watching.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kustody.kube import decode
from kustody.kube.api import Kube
from kustody.kube.errors import KubeError
from kustody.kube.resources import Resource

log = logging.getLogger(__name__)

# (event type: ADDED | MODIFIED | DELETED, the object's metadata-only form)
OnEvent = Callable[[str, dict[str, Any]], None]
# every object present after a (re)list, by (namespace or "", name)
OnRelist = Callable[[Sequence[dict[str, Any]]], None]

_END = object()


class Gone(Exception):
    """The watch's resourceVersion is too old (HTTP 410): list again."""


def read_watch_lines(response: Any, stopped: threading.Event) -> Iterator[dict[str, Any]]:
    """JSON watch events from a streaming response, one per line, until it ends."""
    pending = b""
    for chunk in response.stream(64 * 1024, decode_content=True):
        if stopped.is_set():
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield decode.loads(line)
    if pending.strip():
        yield decode.loads(pending)


class Informer:
    """Keeps a consumer current with one kind: ``sync()`` once, then ``run()``."""

    def __init__(
        self,
        kube: Kube,
        res: Resource,
        on_event: OnEvent,
        on_relist: OnRelist,
        *,
        label_selector: str | None = None,
        timeout_seconds: int = 270,
        retry_seconds: float = 1.0,
        metadata_only: bool = True,
    ) -> None:
        self._kube = kube
        self._res = res
        self._on_event = on_event
        self._on_relist = on_relist
        self._selector = label_selector
        self._timeout = timeout_seconds
        self._retry = retry_seconds
        self._metadata_only = metadata_only
        self.resource_version = ""
        self.relists = 0

    async def sync(self) -> None:
        items, self.resource_version = await self._kube.list_pages(
            self._res, label_selector=self._selector, metadata_only=self._metadata_only
        )
        for item in items:
            _complete(item, self._res)
        self.relists += 1
        self._on_relist(items)

    async def run(self) -> None:
        """Watch until cancelled; relists after 410 Gone, retries other failures."""
        if not self.resource_version:
            await self.sync()
        while True:
            try:
                await self._watch_once()
            except Gone:
                log.info("%s watch expired (410 Gone); listing again", self._res.kind)
                await self._relist()
            except (KubeError, OSError, ValueError) as exc:
                log.warning("%s watch failed: %s; retrying", self._res.kind, exc)
                await asyncio.sleep(self._retry)

    async def _relist(self) -> None:
        while True:
            try:
                await self.sync()
                return
            except KubeError as exc:
                log.warning("%s list failed: %s; retrying", self._res.kind, exc)
                await asyncio.sleep(self._retry)

    async def _watch_once(self) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Any] = asyncio.Queue()
        stopped = threading.Event()
        response = await asyncio.to_thread(
            self._kube.open_watch,
            self._res,
            self.resource_version,
            label_selector=self._selector,
            timeout_seconds=self._timeout,
            metadata_only=self._metadata_only,
        )

        def pump() -> None:
            try:
                for event in read_watch_lines(response, stopped):
                    loop.call_soon_threadsafe(queue.put_nowait, event)
            except Exception as exc:  # handed to the event loop as a value
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, _END)

        reader = threading.Thread(target=pump, name=f"watch-{self._res.plural}", daemon=True)
        reader.start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, Exception):
                    if stopped.is_set():
                        return
                    raise OSError(f"watch stream broke: {type(item).__name__}")
                self._handle(item)
        finally:
            stopped.set()
            with contextlib.suppress(Exception):
                response.shutdown()
            with contextlib.suppress(Exception):
                response.release_conn()

    def _handle(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object") or {}
        if kind == "ERROR":
            if obj.get("code") == 410:
                raise Gone()
            raise OSError(f"watch error {obj.get('code')}: {obj.get('reason')}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if version:
            self.resource_version = str(version)
        if kind == "BOOKMARK":
            return
        _complete(obj, self._res)
        self._on_event(str(kind), obj)


def _complete(obj: dict[str, Any], res: Resource) -> None:
    # PartialObjectMetadata items say kind PartialObjectMetadata, and the items of a LIST say
    # no kind at all; consumers want the real kind.
    obj["apiVersion"] = res.api_version
    obj["kind"] = res.kind
