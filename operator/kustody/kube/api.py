"""A small async REST client over the ``kubernetes`` package's ApiClient.

It speaks plain dicts (no generated models: faster, and the CRDs have none) and runs the
blocking HTTP calls on a dedicated thread pool so that reconcilers stay async.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import email.utils
import json
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kustody.kube import decode
from kustody.kube.errors import Conflict, KubeError, NotFound, Unavailable
from kustody.kube.protocol import MERGE_PATCH
from kustody.kube.resources import Resource

METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_ITEM = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"

Observer = Callable[[str, str, int, float], None]

# How often one request is sent again after the API server said "wait" (429, or 5xx with
# Retry-After), as client-go does, before the caller sees TooManyRequests.
RETRIES_AFTER_WAIT = 3
DEFAULT_RETRY_AFTER = 1.0  # a 429 without Retry-After
MAX_RETRY_AFTER = 120.0  # never trust a header to park the operator for longer


class TooManyRequests(Unavailable):
    """The API server refused the request for now (429 from API Priority and Fairness or a
    proxy, or a 5xx with Retry-After) and said how long to wait: ``retry_after`` seconds."""

    def __init__(self, status: int, reason: str, message: str, retry_after: float) -> None:
        super().__init__(status, reason, message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), capped."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds:  # NaN
        return None
    return min(MAX_RETRY_AFTER, max(0.0, seconds))


def _pool_fits(api_client: Any, threads: int) -> None:
    """One pooled connection per request thread: with fewer, connections beyond the pool are
    opened and dropped again under load ("Connection pool is full, discarding connection")."""
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pool is not None and int(pool.connection_pool_kw.get("maxsize") or 1) < threads:
        pool.connection_pool_kw["maxsize"] = threads
        pool.clear()


def _no_hidden_waits(api_client: Any) -> None:
    """urllib3 by default answers a 429/503 with Retry-After itself for idempotent verbs:
    it sleeps and sends again, unseen (not counted, not shared with the other threads).
    Such answers come back to ``Kube`` instead; connection retries stay as they were."""
    pool = getattr(getattr(api_client, "rest_client", None), "pool_manager", None)
    if pool is None:
        return
    current = pool.connection_pool_kw.get("retries")
    base = current if isinstance(current, urllib3.Retry) else urllib3.Retry(3)
    pool.connection_pool_kw["retries"] = base.new(respect_retry_after_header=False)
    pool.clear()


class _Pause(Exception):
    """One attempt was refused with a Retry-After (internal to ``Kube._request``)."""

    def __init__(self, error: KubeError, retry_after: float) -> None:
        self.error = error
        self.retry_after = retry_after


def load_api_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from ``kubeconfig``, $KUBECONFIG, or the in-cluster ServiceAccount."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


@dataclass(frozen=True)
class _Call:
    """One API request, as the worker thread sends it."""

    method: str
    path: str
    body: Any
    content_type: str
    query: Mapping[str, str] | None
    kind: str
    accept: str


class Kube:
    """Typed async access to the API server. ``observe(verb, kind, status, seconds)`` is
    called for every request (for metrics and the benchmark's request count)."""

    def __init__(self, api_client: Any, *, workers: int = 16, observe: Observer | None = None):
        self._api = api_client
        _pool_fits(api_client, workers)
        _no_hidden_waits(api_client)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self._observe = observe
        # After a Retry-After, no request of this client for the same kind is sent before
        # this (monotonic) time: the server's "wait" applies to the flow, not to one request,
        # so the other threads hold back too instead of collecting 429s of their own. Per
        # kind, as API Priority and Fairness classifies by resource: throttled DataKey
        # writes do not hold back the Lease renewal that keeps this replica the leader.
        self._not_before: dict[str, float] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def close(self) -> None:
        self._closed.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def paused_for(self, kind: str) -> float:
        """Seconds left of the last Retry-After the API server sent for ``kind`` (0: none)."""
        return max(0.0, self._not_before.get(kind, 0.0) - time.monotonic())

    def _pause(self, kind: str, seconds: float) -> None:
        with self._lock:
            until = time.monotonic() + seconds
            self._not_before[kind] = max(self._not_before.get(kind, 0.0), until)

    def _wait_turn(self, kind: str) -> None:
        while (delay := self.paused_for(kind)) > 0 and not self._closed.is_set():
            self._closed.wait(delay)

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        content_type: str = "application/json",
        query: Mapping[str, str] | None = None,
        kind: str = "",
        accept: str = "application/json",
    ) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        call = _Call(method, path, body, content_type, query, kind, accept)
        return await loop.run_in_executor(self._pool, self._request, call)

    def _request(self, call: _Call) -> dict[str, Any]:
        attempt = 0
        while True:
            self._wait_turn(call.kind)
            try:
                return self._send(call)
            except _Pause as pause:
                # Refused before it was handled (APF rejects before executing): safe to send
                # again, for any verb, once the server's wait is over.
                self._pause(call.kind, pause.retry_after)
                attempt += 1
                if attempt > RETRIES_AFTER_WAIT or self._closed.is_set():
                    error = pause.error
                    raise TooManyRequests(
                        error.status, error.reason, error.message, pause.retry_after
                    ) from None

    def _send(self, call: _Call) -> dict[str, Any]:
        method, kind = call.method, call.kind
        started = time.perf_counter()
        status = 0
        try:
            # The generated client's own two steps: build the request (auth headers
            # included), then send it. Plain dicts in and out, no model classes.
            _method, url, headers, payload, post = self._api.param_serialize(
                method,
                call.path,
                query_params=list((call.query or {}).items()),
                header_params={"Content-Type": call.content_type, "Accept": call.accept},
                body=call.body,
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(
                method, url, header_params=headers, body=payload, post_params=post,
                _request_timeout=30,
            )  # fmt: skip
            data = response.read()
            status = int(response.status)
            if status >= 400:
                raise _refusal(status, data, response.headers)
            return decode.loads(data) if data else {}
        except ApiException as exc:
            status = int(exc.status or 0)
            raise _refusal(status, exc.body, exc.headers) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise Unavailable(0, "Unreachable", type(exc).__name__) from None
        finally:
            if self._observe is not None:
                self._observe(method, kind, status, time.perf_counter() - started)

    # -- generic verbs ---------------------------------------------------------------------

    async def get(self, res: Resource, name: str, namespace: str | None = None) -> dict[str, Any]:
        return await self.request("GET", res.path(name, namespace), kind=res.kind)

    async def get_or_none(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None:
        try:
            return await self.get(res, name, namespace)
        except NotFound:
            return None

    async def list(
        self, res: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> list[dict[str, Any]]:
        query = {"labelSelector": label_selector} if label_selector else None
        result = await self.request("GET", res.path(None, namespace), query=query, kind=res.kind)
        items: list[dict[str, Any]] = result.get("items", [])
        return items

    async def list_metadata(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        page_size: int = 500,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """Every object's metadata only (PartialObjectMetadata), page by page: a Secret's
        data never crosses the wire. Returns the items and the list's resourceVersion."""
        return await self.list_pages(
            res, namespace, label_selector, page_size=page_size, metadata_only=True
        )

    async def list_pages(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        page_size: int = 500,
        metadata_only: bool = False,
    ) -> tuple[builtins.list[dict[str, Any]], str]:
        """Every object (or its metadata only), page by page; returns the items and the
        list's resourceVersion (a watch resumes from it)."""
        items: builtins.list[dict[str, Any]] = []
        query: dict[str, str] = {"limit": str(page_size)}
        if label_selector:
            query["labelSelector"] = label_selector
        accept = METADATA_LIST if metadata_only else "application/json"
        while True:
            page = await self.request(
                "GET", res.path(None, namespace), query=query, kind=res.kind, accept=accept
            )
            items.extend(page.get("items") or ())
            meta = page.get("metadata") or {}
            if not meta.get("continue"):
                return items, str(meta.get("resourceVersion") or "")
            query["continue"] = str(meta["continue"])

    def open_watch(
        self,
        res: Resource,
        resource_version: str,
        *,
        label_selector: str | None = None,
        timeout_seconds: int = 270,
        metadata_only: bool = False,
    ) -> Any:
        """A blocking watch response to read line by line (``read_watch_lines``); call from
        a thread. Each line is one JSON watch event."""
        query = [
            ("watch", "true"),
            ("resourceVersion", resource_version),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", str(timeout_seconds)),
        ]
        if label_selector:
            query.append(("labelSelector", label_selector))
        self._wait_turn(res.kind)
        _method, url, headers, payload, post = self._api.param_serialize(
            "GET",
            res.path(None, None),
            query_params=query,
            header_params={"Accept": METADATA_ITEM if metadata_only else "application/json"},
            auth_settings=["BearerToken"],
        )
        started, status = time.perf_counter(), 0
        try:
            response = self._api.call_api(
                "GET", url, header_params=headers, body=payload, post_params=post,
                _request_timeout=(10, timeout_seconds + 30),
            )  # fmt: skip
            status = int(response.status)
            if status >= 400:
                raise self._watch_refused(res.kind, status, response.read(), response.headers)
            return response.response
        except ApiException as exc:
            status = int(exc.status or 0)
            raise self._watch_refused(res.kind, status, exc.body, exc.headers) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise Unavailable(0, "Unreachable", type(exc).__name__) from None
        finally:
            # Counted like every other request (the opening of the stream, not its length).
            if self._observe is not None:
                self._observe("WATCH", res.kind, status, time.perf_counter() - started)

    def _watch_refused(
        self, kind: str, status: int, raw: bytes | str | None, headers: Any
    ) -> KubeError:
        refusal = _refusal(status, raw, headers)
        if isinstance(refusal, _Pause):
            self._pause(kind, refusal.retry_after)
            error = refusal.error
            return TooManyRequests(error.status, error.reason, error.message, refusal.retry_after)
        return refusal

    async def create(
        self, res: Resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        return await self.request("POST", res.path(None, namespace), body=body, kind=res.kind)

    async def replace(
        self, res: Resource, name: str, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]:
        return await self.request("PUT", res.path(name, namespace), body=body, kind=res.kind)

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> dict[str, Any]:
        path = res.path(name, namespace) + (f"/{subresource}" if subresource else "")
        return await self.request(
            "PATCH", path, body=patch, content_type=content_type, kind=res.kind
        )

    async def patch_status(
        self,
        res: Resource,
        name: str,
        status: Mapping[str, Any],
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]:
        """Merge-patch ``status``; with ``resource_version``, fail with Conflict if stale."""
        patch: dict[str, Any] = {"status": dict(status)}
        if resource_version:
            patch["metadata"] = {"resourceVersion": resource_version}
        return await self.patch(res, name, patch, namespace, subresource="status")

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> None:
        with contextlib.suppress(NotFound):
            await self.request("DELETE", res.path(name, namespace), kind=res.kind)


def _refusal(status: int, raw: bytes | str | None, headers: Any) -> KubeError | _Pause:
    """The error for a failed response; a ``_Pause`` when the server said to wait."""
    error = _error(status, raw)
    if status == 429 or (status >= 500 and headers is not None):
        value = headers.get("Retry-After") if headers is not None else None
        retry_after = parse_retry_after(value)
        if retry_after is not None:
            return _Pause(error, retry_after)
        if status == 429:
            return _Pause(error, DEFAULT_RETRY_AFTER)
    return error


def _error(status: int, raw: bytes | str | None) -> KubeError:
    reason, message = "", ""
    try:
        body = json.loads(raw or "{}")
        reason = str(body.get("reason") or reason)
        message = str(body.get("message") or "")
    except (TypeError, ValueError):
        pass
    if status == 404:
        return NotFound(status, reason, message)
    if status == 409:
        return Conflict(status, reason, message)
    if status in (0, 429) or status >= 500:
        return Unavailable(status, reason, message)
    return KubeError(status, reason, message)
