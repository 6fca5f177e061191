"""Kopf, and only here: it watches KeyRings, RotationPolicies, EscrowAgents and Namespaces
and hands each event to its handler in :mod:`kustody.controller.events`; its settings for a
watch-only use; the login; a quiet teardown. (DataKeys and Secrets come through
:class:`kustody.kube.informer.Informer`: many objects, little per-event cost.)
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import kopf

from kustody.controller.events import Handler, kopf_stores
from kustody.controller.runtime import Runtime

log = logging.getLogger(__name__)


def _registry(rt: Runtime, kubeconfig: str | None) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()

    @kopf.on.startup(registry=registry)
    def _configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings)

    @kopf.on.login(registry=registry)
    def _login(**kwargs: Any) -> Any:
        if kubeconfig is None and os.environ.get("KUBERNETES_SERVICE_HOST"):
            return kopf.login_with_service_account(**kwargs)
        return kopf.login_with_kubeconfig(**kwargs)

    register(registry, rt)
    return registry


def quiet_teardown(stop: asyncio.Event) -> None:
    """Once we are stopping, Kopf's watch generators may raise while asyncio finalises them
    (a cancelled stream mid-iteration): harmless at exit, so logged at DEBUG. Anything else,
    or anything before the stop, still goes to the default handler."""
    loop = asyncio.get_running_loop()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        agen = context.get("asyncgen")
        module = getattr(getattr(agen, "ag_code", None), "co_filename", "")
        if stop.is_set() and agen is not None and "/kopf/" in module:
            log.debug("Kopf stream finalised at exit: %s", context.get("message"))
            return
        loop.default_exception_handler(context)

    loop.set_exception_handler(handler)


def serve(rt: Runtime, kubeconfig: str | None, stop: asyncio.Event) -> Coroutine[Any, Any, None]:
    """Kopf's watches of the custom resources and Namespaces, until ``stop`` is set."""
    return kopf.operator(
        registry=_registry(rt, kubeconfig),
        clusterwide=True,
        standalone=True,
        stop_flag=stop,
    )


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    for _store, res, handler in kopf_stores(rt):
        on_event = kopf.on.event(
            res.group, res.version, res.plural, id=f"record-{res.plural}", registry=registry
        )
        on_event(_bound(rt, handler))


def _bound(rt: Runtime, handler: Handler) -> Callable[..., Awaitable[None]]:
    async def on_event(event: Mapping[str, Any], **_: Any) -> None:
        handler(rt, event)

    return on_event


class _NoDiffBase(kopf.DiffBaseStorage):
    """Kustody registers only event handlers (:func:`register`): nothing compares diff bases,
    so none is built or read. Kopf's default builds one per event by deep-copying the whole
    object (status included, then dropped): about a tenth of the operator's CPU at scale."""

    def build(self, *, body: Any, extra_fields: Any = None) -> Any:
        return kopf.BodyEssence()

    def fetch(self, *, body: Any) -> Any:
        return None

    def store(self, *, body: Any, patch: Any, essence: Any) -> None:
        return None


def configure(settings: kopf.OperatorSettings) -> None:
    """Kopf settings for a watch-only use: no peering, no posting, no diff bases, bounded
    watches."""
    settings.persistence.diffbase_storage = _NoDiffBase()
    settings.peering.standalone = True  # one active replica is ensured by our Lease
    settings.posting.enabled = False  # Events are ours, deduplicated (kube.events)
    settings.watching.server_timeout = 270  # streams silently die without it (kopf #585)
    settings.watching.client_timeout = 300
    settings.networking.request_timeout = 60
