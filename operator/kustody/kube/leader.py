"""Leader election with a coordination.k8s.io Lease, as client-go's leaderelection does.

Only the holder of the Lease reconciles. A holder that cannot renew within ``renew_deadline``
stops acting at once (the process exits and is restarted), so two replicas never act
together for longer than the lease allows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from typing import Any

from kustody.domain.timestamps import format_micro_time, parse_time
from kustody.kube.api import Kube
from kustody.kube.errors import Conflict, KubeError, NotFound
from kustody.kube.resources import LEASES

log = logging.getLogger(__name__)


class LeaderElector:
    def __init__(
        self,
        kube: Kube,
        namespace: str,
        name: str,
        identity: str,
        *,
        lease_duration: float = 15.0,
        renew_deadline: float = 10.0,
        retry_period: float = 2.0,
    ) -> None:
        self._kube = kube
        self.namespace = namespace
        self.name = name
        self.identity = identity
        self.lease_duration = lease_duration
        self.renew_deadline = renew_deadline
        self.retry_period = retry_period

    async def acquire(self) -> None:
        """Wait until this process holds the Lease."""
        announced = False
        while True:
            try:
                if await self._try_acquire_or_renew():
                    log.info("acquired lease %s/%s as %s", self.namespace, self.name, self.identity)
                    return
            except KubeError as exc:
                log.warning("lease %s/%s: %s", self.namespace, self.name, exc)
            if not announced:
                log.info("waiting for lease %s/%s (standby)", self.namespace, self.name)
                announced = True
            await asyncio.sleep(self.retry_period)

    async def hold(self) -> None:
        """Renew until renewal fails for ``renew_deadline``; then return (leadership lost)."""
        last_renewed = asyncio.get_running_loop().time()
        while True:
            await asyncio.sleep(self.retry_period)
            try:
                if await self._try_acquire_or_renew():
                    last_renewed = asyncio.get_running_loop().time()
                    continue
                log.error("lease %s/%s was taken by another replica", self.namespace, self.name)
                return
            except KubeError as exc:
                log.warning("could not renew lease %s/%s: %s", self.namespace, self.name, exc)
            if asyncio.get_running_loop().time() - last_renewed > self.renew_deadline:
                log.error(
                    "lost lease %s/%s: not renewed in %.0fs",
                    self.namespace,
                    self.name,
                    self.renew_deadline,
                )
                return

    async def release(self) -> None:
        """Give the Lease up so that a standby takes over without waiting for it to expire."""
        try:
            lease = await self._kube.get(LEASES, self.name, self.namespace)
            if lease.get("spec", {}).get("holderIdentity") != self.identity:
                return
            lease["spec"]["holderIdentity"] = None
            lease["spec"]["leaseDurationSeconds"] = 1
            await self._kube.replace(LEASES, self.name, lease, self.namespace)
        except KubeError as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, exc)

    async def holder(self) -> str | None:
        lease = await self._kube.get_or_none(LEASES, self.name, self.namespace)
        return None if lease is None else lease.get("spec", {}).get("holderIdentity")

    async def _try_acquire_or_renew(self) -> bool:
        now = dt.datetime.now(dt.UTC)
        spec: dict[str, Any] = {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": int(self.lease_duration),
            "renewTime": format_micro_time(now),
        }
        try:
            lease = await self._kube.get(LEASES, self.name, self.namespace)
        except NotFound:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": {**spec, "acquireTime": format_micro_time(now), "leaseTransitions": 0},
            }
            try:
                await self._kube.create(LEASES, body, self.namespace)
            except Conflict:
                return False
            return True
        current = lease.get("spec") or {}
        holder = current.get("holderIdentity")
        renewed = parse_time(current.get("renewTime"))
        duration = float(current.get("leaseDurationSeconds") or self.lease_duration)
        expired = renewed is None or now > renewed + dt.timedelta(seconds=duration)
        if holder and holder != self.identity and not expired:
            return False
        if holder != self.identity:
            spec["acquireTime"] = format_micro_time(now)
            spec["leaseTransitions"] = int(current.get("leaseTransitions") or 0) + 1
        lease["spec"] = {**current, **spec}
        try:
            await self._kube.replace(LEASES, self.name, lease, self.namespace)
        except Conflict:
            return False
        return True
