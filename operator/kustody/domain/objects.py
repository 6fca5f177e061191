"""Kubernetes object metadata, parsed once where an object enters a reconciler.

Reconcilers read ``meta.name``, ``meta.annotations.get(...)`` and ``meta.deleting`` instead of
walking ``obj.get("metadata") or {}``; the raw object still travels alongside as the handle
for Events and writes (it is what the API server returned).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def _strings(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        return {}
    return {str(k): str(v) for k, v in raw.items() if v is not None}


@dataclass(frozen=True)
class OwnerRef:
    api_version: str
    kind: str
    name: str
    uid: str
    controller: bool = False


@dataclass(frozen=True)
class ObjectMeta:
    name: str
    namespace: str | None = None
    uid: str = ""
    generation: int = 0
    resource_version: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    finalizers: tuple[str, ...] = ()
    deleting: bool = False
    owners: tuple[OwnerRef, ...] = ()

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> ObjectMeta:
        """The metadata of ``obj`` (missing fields become empty values)."""
        raw = obj.get("metadata")
        meta: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
        owners = tuple(
            OwnerRef(
                str(r.get("apiVersion") or ""),
                str(r.get("kind") or ""),
                str(r.get("name") or ""),
                str(r.get("uid") or ""),
                bool(r.get("controller")),
            )
            for r in meta.get("ownerReferences") or ()
            if isinstance(r, Mapping)
        )
        namespace = meta.get("namespace")
        return cls(
            name=str(meta.get("name") or ""),
            namespace=str(namespace) if namespace else None,
            uid=str(meta.get("uid") or ""),
            generation=int(meta.get("generation") or 0),
            resource_version=str(meta.get("resourceVersion") or ""),
            labels=_strings(meta.get("labels")),
            annotations=_strings(meta.get("annotations")),
            finalizers=tuple(str(f) for f in meta.get("finalizers") or ()),
            deleting=bool(meta.get("deletionTimestamp")),
            owners=owners,
        )

    def controller(self, kind: str, group: str) -> OwnerRef | None:
        """The controlling owner of this kind in this API group, if there is one."""
        for ref in self.owners:
            if (
                ref.controller
                and ref.kind == kind
                and ref.api_version.startswith(f"{group}/")
                and ref.name
                and ref.uid
            ):
                return ref
        return None
