"""Rollout restarts of the workloads a DataKey names, once per DEK generation, and only of
workloads that opted in (``kustody.io/allow-rollout-restart``)."""

from __future__ import annotations

from kustody.controller.datakey.state import DataKeyPass
from kustody.kube import workloads
from kustody.kube.errors import NotFound


async def restart_targets(p: DataKeyPass, generation: int) -> None:
    events = p.rt.events
    for target in p.spec.restart_targets:
        try:
            patched = await workloads.restart(
                p.rt.kube, p.namespace, target.kind, target.name, p.name, generation
            )
        except NotFound:
            await events.warning(
                p.obj,
                "RolloutTargetNotFound",
                f"{target.kind} {target.name} does not exist; not restarted",
            )
            continue
        except workloads.NotOptedIn:
            await events.warning(
                p.obj,
                "RolloutTargetNotOptedIn",
                f"{target.kind} {target.name} was not restarted: it must list this DataKey "
                f"in its annotation {workloads.OPT_IN_ANNOTATION}",
            )
            continue
        if patched:
            await events.normal(
                p.obj,
                "RolloutRestartTriggered",
                f"restarted {target.kind} {target.name} for data key generation {generation}",
            )
