"""API paths of the kinds Kustody reads and writes."""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "kustody.io"
VERSION = "v1alpha1"


@dataclass(frozen=True)
class Resource:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, name: str | None = None, namespace: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        if self.namespaced and namespace is not None:
            base += f"/namespaces/{namespace}"
        base += f"/{self.plural}"
        return f"{base}/{name}" if name else base


KEYRINGS = Resource(GROUP, VERSION, "keyrings", "KeyRing", namespaced=False)
DATAKEYS = Resource(GROUP, VERSION, "datakeys", "DataKey", namespaced=True)
ROTATION_POLICIES = Resource(GROUP, VERSION, "rotationpolicies", "RotationPolicy", False)
ESCROW_AGENTS = Resource(GROUP, VERSION, "escrowagents", "EscrowAgent", namespaced=False)
SECRETS = Resource("", "v1", "secrets", "Secret", namespaced=True)
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
EVENTS = Resource("", "v1", "events", "Event", namespaced=True)
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease", namespaced=True)
WORKLOADS = {
    "Deployment": Resource("apps", "v1", "deployments", "Deployment", namespaced=True),
    "StatefulSet": Resource("apps", "v1", "statefulsets", "StatefulSet", namespaced=True),
    "DaemonSet": Resource("apps", "v1", "daemonsets", "DaemonSet", namespaced=True),
}
