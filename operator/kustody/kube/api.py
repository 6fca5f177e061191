"""A small async REST client over the ``kubernetes`` package's ApiClient.

It speaks plain dicts (no generated models: faster, and the CRDs have none) and runs the
blocking HTTP calls on a dedicated thread pool so that reconcilers stay async.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kustody.kube.errors import Conflict, KubeError, NotFound, Unavailable
from kustody.kube.resources import Resource

MERGE_PATCH = "application/merge-patch+json"
METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
METADATA_ITEM = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
JSON_PATCH = "application/json-patch+json"

Observer = Callable[[str, str, int, float], None]


def load_api_client(kubeconfig: str | None = None) -> Any:
    """An ApiClient from ``kubeconfig``, $KUBECONFIG, or the in-cluster ServiceAccount."""
    if kubeconfig:
        return config.new_client_from_config(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        return config.new_client_from_config()  # type: ignore[no-untyped-call]
    return client.ApiClient()


class Kube:
    """Typed async access to the API server. ``observe(verb, kind, status, seconds)`` is
    called for every request (for metrics and the benchmark's request count)."""

    def __init__(self, api_client: Any, *, workers: int = 16, observe: Observer | None = None):
        self._api = api_client
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kube")
        self._observe = observe

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

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
        return await loop.run_in_executor(
            self._pool, self._request, method, path, body, content_type, query, kind, accept
        )

    def _request(
        self,
        method: str,
        path: str,
        body: Any,
        content_type: str,
        query: Mapping[str, str] | None,
        kind: str,
        accept: str,
    ) -> dict[str, Any]:
        started = time.perf_counter()
        status = 0
        try:
            # The generated client's own two steps: build the request (auth headers
            # included), then send it. Plain dicts in and out, no model classes.
            _method, url, headers, payload, post = self._api.param_serialize(
                method,
                path,
                query_params=list((query or {}).items()),
                header_params={"Content-Type": content_type, "Accept": accept},
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._api.call_api(
                method, url, header_params=headers, body=payload, post_params=post,
                _request_timeout=30,
            )  # fmt: skip
            data = response.read()
            status = int(response.status)
            if status >= 400:
                raise _error(status, data)
            return json.loads(data) if data else {}
        except ApiException as exc:
            status = int(exc.status or 0)
            raise _error(status, exc.body) from None
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
        items: builtins.list[dict[str, Any]] = []
        query: dict[str, str] = {"limit": str(page_size)}
        if label_selector:
            query["labelSelector"] = label_selector
        while True:
            page = await self.request(
                "GET", res.path(None, namespace), query=query, kind=res.kind, accept=METADATA_LIST
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
        _method, url, headers, payload, post = self._api.param_serialize(
            "GET",
            res.path(None, None),
            query_params=query,
            header_params={"Accept": METADATA_ITEM if metadata_only else "application/json"},
            auth_settings=["BearerToken"],
        )
        try:
            response = self._api.call_api(
                "GET", url, header_params=headers, body=payload, post_params=post,
                _request_timeout=(10, timeout_seconds + 30),
            )  # fmt: skip
        except ApiException as exc:
            raise _error(int(exc.status or 0), exc.body) from None
        except (OSError, urllib3.exceptions.HTTPError) as exc:
            raise Unavailable(0, "Unreachable", type(exc).__name__) from None
        if int(response.status) >= 400:
            raise _error(int(response.status), response.read())
        return response.response

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
