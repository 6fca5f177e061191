"""Rolling restarts of the workloads that read a DataKey's Secret."""

from __future__ import annotations

from kustody.kube.api import JSON_PATCH, Kube
from kustody.kube.resources import WORKLOADS

# One annotation per DataKey (DataKey names are at most 63 characters, a valid name part).
ANNOTATION_PREFIX = "dk.kustody.io/"


def restart_annotation(datakey: str) -> str:
    return f"{ANNOTATION_PREFIX}{datakey}"


async def restart(
    kube: Kube, namespace: str, kind: str, name: str, datakey: str, generation: int
) -> bool:
    """Bump the pod template annotation for ``datakey`` to ``generation``.

    Idempotent: a workload whose template already carries this generation is left alone, so
    a retry or a crash-restart never causes a second rollout. Returns whether it patched.
    Raises ``kustody.kube.errors.NotFound`` if the workload does not exist.
    """
    res = WORKLOADS[kind]
    live = await kube.get(res, name, namespace)
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
