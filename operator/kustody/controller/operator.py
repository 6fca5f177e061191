"""The operator process: leader election, cache sync, Kopf watches and reconcile workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kustody.api.client import HsmClient, HsmError
from kustody.controller import events, watch
from kustody.controller.datakey import reconciler as datakey
from kustody.controller.escrow import reconciler as escrow
from kustody.controller.keyring import reconciler as keyring
from kustody.controller.metrics import OperatorMetrics
from kustody.controller.policy import reconciler as policy
from kustody.controller.runtime import DATAKEY, ESCROW_AGENT, KEYRING, POLICY, QueueKey, Runtime
from kustody.domain.secret import MANAGED_BY, MANAGER
from kustody.kube.api import Kube, TooManyRequests, load_api_client
from kustody.kube.errors import Conflict, KubeError, NotFound
from kustody.kube.events import EventRecorder
from kustody.kube.informer import Informer
from kustody.kube.leader import LeaderElector
from kustody.kube.resources import (
    DATAKEYS,
    ESCROW_AGENTS,
    KEYRINGS,
    NAMESPACES,
    ROTATION_POLICIES,
    SECRETS,
)

log = logging.getLogger("kustody.operator")


@dataclass(frozen=True)
class RemoteHsm:
    """A remote ``kustody hsm`` (on-premises key service) reached over mTLS."""

    endpoint: str
    cert: Path
    key: Path
    ca: Path
    server_name: str | None = None

    def client(self, timeout: float) -> HsmClient:
        return HsmClient.tcp(
            self.endpoint,
            ca=self.ca.read_bytes(),
            cert=self.cert.read_bytes(),
            key=self.key.read_bytes(),
            server_name=self.server_name,
            timeout=timeout,
        )


@dataclass(frozen=True)
class OperatorConfig:
    hsm_socket: Path
    remote: RemoteHsm | None = None
    kubeconfig: str | None = None
    namespace: str = "kustody-system"
    lease_name: str = "kustody-operator"
    identity: str = ""
    leader_election: bool = True
    metrics_port: int | None = None
    metrics_address: str = "0.0.0.0"  # noqa: S104 - the metrics port is meant to be scraped
    workers: int = 64
    kube_threads: int = 16
    resync_seconds: float = 300.0
    health_seconds: float = 10.0
    hsm_timeout: float = 10.0


def secret_informer(rt: Runtime, kube: Kube, relisted: asyncio.Event) -> Informer:
    """Secrets are watched as metadata only (their data never enters the operator). Every
    relist sets ``relisted``: after the first, a relist means the watches broke (410 Gone, an
    API-server restart), and the other stores, whose Kopf relists report no deletions, are
    pruned (after the first it is one harmless extra LIST)."""

    def on_relist(items: Any) -> None:
        events.secrets_relisted(rt, items)
        relisted.set()

    return Informer(
        kube,
        SECRETS,
        lambda kind, obj: events.secret_event(rt, kind, obj),
        on_relist,
        label_selector=f"{MANAGED_BY}={MANAGER}",
    )


def datakey_informer(rt: Runtime, kube: Kube) -> Informer:
    """DataKeys, whole, through an informer rather than Kopf: the kind there are most of, and
    the one whose events Kopf's per-event machinery made the operator's largest CPU cost."""

    def on_relist(items: Any) -> None:
        events.datakeys_relisted(rt, items, informer.resource_version)

    informer = Informer(
        kube,
        DATAKEYS,
        lambda kind, obj: events.datakey_watched(rt, kind, obj),
        on_relist,
        metadata_only=False,
    )
    return informer


async def _prune(rt: Runtime, every: float, relisted: asyncio.Event) -> None:
    """Forget objects deleted while a watch was broken: after every watch relist, and at
    every resync."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(relisted.wait(), every)
        relisted.clear()
        await asyncio.sleep(2.0)  # let the watches settle after a relist
        await events.prune(rt, rt.kube)


async def _sync(rt: Runtime, datakeys: Informer, secrets: Informer) -> None:
    """Fill every store from a LIST before any reconcile runs (no decisions on a half cache).
    DataKeys come before Secrets: a Secret is kept only if its DataKey is known."""
    kinds = (
        (rt.keyrings, KEYRINGS),
        (rt.policies, ROTATION_POLICIES),
        (rt.namespaces, NAMESPACES),
        (rt.escrow_agents, ESCROW_AGENTS),
    )
    for store, res in kinds:
        for obj in await rt.kube.list(res):
            obj.setdefault("apiVersion", res.api_version)
            obj.setdefault("kind", res.kind)
            store.put(obj)
    await datakeys.sync()
    await secrets.sync()
    _enqueue_all(rt)


def _enqueue_all(rt: Runtime) -> None:
    for ns, name in rt.policies:
        rt.enqueue(POLICY, ns, name)
    for ns, name in rt.keyrings:
        rt.enqueue(KEYRING, ns, name)
    for ns, name in rt.datakeys:
        rt.enqueue(DATAKEY, ns, name)
    for ns, name in rt.escrow_agents:
        rt.enqueue(ESCROW_AGENT, ns, name)


_RECONCILERS: dict[str, Callable[[Runtime, str, str], Awaitable[float | None]]] = {
    KEYRING: lambda rt, _ns, name: keyring.reconcile(rt, name),
    DATAKEY: datakey.reconcile,
    POLICY: lambda rt, _ns, name: policy.reconcile(rt, name),
    ESCROW_AGENT: lambda rt, _ns, name: escrow.reconcile_agent(rt, name),
}


async def _worker(rt: Runtime) -> None:
    loop = asyncio.get_running_loop()
    while True:
        key: QueueKey = await rt.queue.get()
        kind, namespace, name = key
        started = time.perf_counter()
        outcome = "ok"
        hold = 0.0  # seconds the key stays checked out after this pass (Retry-After)
        try:
            again = await _RECONCILERS[kind](rt, namespace, name)
            rt.queue.forget(key)
            if again is not None:
                rt.queue.add(key, again)
        except Conflict:
            outcome = "conflict"  # a newer version is on its way through the watch
            rt.queue.add(key, 0.5)
        except NotFound:
            outcome = "gone"
        except TooManyRequests as exc:
            # The API server said how long to wait: that is the least this key waits (its
            # own backoff may be longer). It stays checked out until then, so nothing runs it
            # sooner; the worker itself is free at once.
            outcome = "throttled"
            delay = rt.queue.retry(key)
            hold = max(0.0, exc.retry_after - delay)
            log.info(
                "%s %s/%s: API server asked to wait %.0fs (429); retry in %.1fs (queue %d)",
                kind, namespace, name, exc.retry_after, delay + hold, len(rt.queue),
            )  # fmt: skip
        except (HsmError, KubeError) as exc:
            outcome = "error"
            delay = rt.queue.retry(key)
            log.warning("%s %s/%s: %s (retry in %.1fs)", kind, namespace, name, exc, delay)
        except Exception:
            outcome = "error"
            delay = rt.queue.retry(key)
            log.exception(
                "%s %s/%s failed unexpectedly (retry in %.1fs)", kind, namespace, name, delay
            )
        finally:
            if hold > 0:
                loop.call_later(hold, rt.queue.done, key)
            else:
                rt.queue.done(key)
            rt.metrics.reconcile.labels(kind, outcome).observe(time.perf_counter() - started)


async def _resync(rt: Runtime, every: float) -> None:
    while True:
        await asyncio.sleep(every)
        _enqueue_all(rt)


async def _watch_hsm(rt: Runtime, every: float) -> None:
    while True:
        try:
            health = await rt.hsm.health()
            serving, reason, message = health.serving, str(health.reason or ""), health.message
        except HsmError as exc:
            serving, reason, message = False, str(exc.reason), exc.message
        was = rt.health.serving
        came_back = rt.hsm_checked(serving, reason, message)
        if came_back:
            log.info("HSM sidecar is serving again; resuming")
            _enqueue_all(rt)
        elif was is not False and not serving:
            log.warning("HSM sidecar not serving: %s %s", reason, message)
            for ns, name in rt.keyrings:
                rt.enqueue(KEYRING, ns, name)
        await asyncio.sleep(every)


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def run(config: OperatorConfig, stop: asyncio.Event | None = None) -> int:
    """Run until ``stop`` is set (0) or leadership is lost (1)."""
    if config.kubeconfig:
        os.environ["KUBECONFIG"] = config.kubeconfig
    stop = stop or asyncio.Event()
    watch.quiet_teardown(stop)
    metrics = OperatorMetrics()
    kube = Kube(
        load_api_client(config.kubeconfig),
        workers=config.kube_threads,
        observe=metrics.observe_kube,
    )
    identity = config.identity or f"{socket.gethostname()}-{os.getpid()}"
    elector = LeaderElector(kube, config.namespace, config.lease_name, identity)
    hsm = (
        config.remote.client(config.hsm_timeout)
        if config.remote is not None
        else HsmClient.unix(config.hsm_socket, timeout=config.hsm_timeout)
    )
    rt = Runtime(kube, hsm, EventRecorder(kube), metrics, namespace=config.namespace)
    metrics.watch_objects(rt.keyrings, rt.datakeys, rt.clock)
    metrics.watch_queue(lambda: len(rt.queue))
    server = (
        metrics.serve(config.metrics_port, config.metrics_address) if config.metrics_port else None
    )
    exit_code = 0
    tasks: list[asyncio.Task[Any]] = []
    try:
        if config.leader_election:
            acquired = asyncio.ensure_future(elector.acquire())
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({acquired, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not acquired.done():
                acquired.cancel()
                return 0
            stopping.cancel()
        log.info("operator %s is active; syncing caches", identity)
        relisted = asyncio.Event()
        datakeys = datakey_informer(rt, kube)
        secrets = secret_informer(rt, kube, relisted)
        while True:
            try:
                await _sync(rt, datakeys, secrets)
                break
            except NotFound:
                log.error(
                    "the kustody.io CRDs are not installed; install them with "
                    "`kubectl apply --server-side -f crds/` (or the Helm chart); retrying in 5s"
                )
                if await _stopped(stop, 5.0):
                    return 0
        log.info(
            "synced %d KeyRings, %d DataKeys, %d RotationPolicies, %d Secrets",
            len(rt.keyrings),
            len(rt.datakeys),
            len(rt.policies),
            len(rt.secrets),
        )
        kopf_stop = asyncio.Event()
        tasks = [
            asyncio.create_task(
                watch.serve(rt, config.kubeconfig, kopf_stop),
                name="kopf",
            ),
            asyncio.create_task(datakeys.run(), name="datakeys-watch"),
            asyncio.create_task(secrets.run(), name="secrets-watch"),
            asyncio.create_task(_prune(rt, config.resync_seconds, relisted), name="prune"),
            asyncio.create_task(_resync(rt, config.resync_seconds), name="resync"),
            asyncio.create_task(_watch_hsm(rt, config.health_seconds), name="hsm-health"),
            *(asyncio.create_task(_worker(rt), name=f"worker-{i}") for i in range(config.workers)),
        ]
        waiters: set[asyncio.Future[Any]] = {asyncio.ensure_future(stop.wait())}
        if config.leader_election:
            waiters.add(asyncio.ensure_future(elector.hold()))
        done, _ = await asyncio.wait(waiters | {tasks[0]}, return_when=asyncio.FIRST_COMPLETED)
        if tasks[0] in done or not stop.is_set():
            exit_code = 1
            log.error("stopping: %s", "kopf exited" if tasks[0] in done else "leadership lost")
        for w in waiters:
            w.cancel()
        kopf_stop.set()
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            await asyncio.wait_for(tasks[0], 10)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if config.leader_election and exit_code == 0:
            await elector.release()
        await hsm.close()
        kube.close()
        if server is not None:
            server.shutdown()
    return exit_code
