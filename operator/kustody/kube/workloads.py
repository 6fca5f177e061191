"""Rolling restarts of the workloads that read a DataKey's Secret."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kustody.kube.protocol import JSON_PATCH, KubeApi
from kustody.kube.resources import WORKLOADS

# One annotation per DataKey (DataKey names are at most 63 characters, a valid name part).
ANNOTATION_PREFIX = "dk.kustody.io/"
# On the workload itself: the DataKeys (comma-separated names) that may restart it. Writing a
# DataKey must not be enough to restart any workload of the namespace.
OPT_IN_ANNOTATION = "kustody.io/allow-rollout-restart"


class NotOptedIn(Exception):
    """The workload does not name the DataKey in its opt-in annotation."""


def opted_in(workload: Mapping[str, Any], datakey: str) -> bool:
    annotations = (workload.get("metadata") or {}).get("annotations") or {}
    names = str(annotations.get(OPT_IN_ANNOTATION) or "")
    return datakey in {n.strip() for n in names.split(",")}


def restart_annotation(datakey: str) -> str:
    return f"{ANNOTATION_PREFIX}{datakey}"


async def restart(
    kube: KubeApi, namespace: str, kind: str, name: str, datakey: str, generation: int
) -> bool:
    """Bump the pod template annotation for ``datakey`` to ``generation``.

    Idempotent: a workload whose template already carries this generation is left alone, so
    a retry or a crash-restart never causes a second rollout. Returns whether it patched.
    Raises ``kustody.kube.errors.NotFound`` if the workload does not exist and
    :class:`NotOptedIn` if it does not allow ``datakey`` to restart it.
    """
    res = WORKLOADS[kind]
    live = await kube.get(res, name, namespace)
    if not opted_in(live, datakey):
        raise NotOptedIn(f"{kind} {name} does not list {datakey} in {OPT_IN_ANNOTATION}")
    template_meta = live.get("spec", {}).get("template", {}).get("metadata") or {}
    annotations = template_meta.get("annotations") or {}
    key = restart_annotation(datakey)
    if annotations.get(key) == str(generation):
        return False
    escaped = key.replace("~", "~0").replace("/", "~1")
    ops: list[dict[str, object]] = [
        {
            "op": "test",
            "path": "/metadata/resourceVersion",
            "value": live["metadata"]["resourceVersion"],
        },
    ]
    if not template_meta:
        ops.append({"op": "add", "path": "/spec/template/metadata", "value": {}})
    if not annotations:
        ops.append({"op": "add", "path": "/spec/template/metadata/annotations", "value": {}})
    ops.append(
        {
            "op": "add",
            "path": f"/spec/template/metadata/annotations/{escaped}",
            "value": str(generation),
        }
    )
    await kube.patch(res, name, ops, namespace, content_type=JSON_PATCH)
    return True
