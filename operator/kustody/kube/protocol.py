"""The Kubernetes API calls the controller makes, as a Protocol: :class:`kustody.kube.api.Kube`
implements it, and so does the in-memory :class:`kustody.testing.fakes.FakeKube`."""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from typing import Any, Protocol

from kustody.kube.resources import Resource

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"


class KubeApi(Protocol):
    """The Kubernetes API calls the controller makes (:class:`kustody.kube.api.Kube`)."""

    async def get(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any]: ...

    async def get_or_none(
        self, res: Resource, name: str, namespace: str | None = None
    ) -> dict[str, Any] | None: ...

    async def list(
        self, res: Resource, namespace: str | None = None, label_selector: str | None = None
    ) -> builtins.list[dict[str, Any]]: ...

    async def list_metadata(
        self,
        res: Resource,
        namespace: str | None = None,
        label_selector: str | None = None,
        *,
        page_size: int = 500,
    ) -> tuple[builtins.list[dict[str, Any]], str]: ...

    async def create(
        self, res: Resource, body: Mapping[str, Any], namespace: str | None = None
    ) -> dict[str, Any]: ...

    async def patch(
        self,
        res: Resource,
        name: str,
        patch: Any,
        namespace: str | None = None,
        *,
        subresource: str = "",
        content_type: str = MERGE_PATCH,
    ) -> dict[str, Any]: ...

    async def patch_status(
        self,
        res: Resource,
        name: str,
        status: Mapping[str, Any],
        namespace: str | None = None,
        *,
        resource_version: str | None = None,
    ) -> dict[str, Any]: ...

    async def delete(self, res: Resource, name: str, namespace: str | None = None) -> None: ...
