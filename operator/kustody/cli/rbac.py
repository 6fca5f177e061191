"""What the operator's ServiceAccount must be allowed to do: the chart's RBAC, as checks.

Kept equal to ``charts/kustody/templates/rbac.yaml`` (the operator's ClusterRole and its
leader-election Role) by ``tests/cluster/test_cli.py``; ``kustody doctor`` asks the API server
(SubjectAccessReview) about each item.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Permission:
    group: str
    resource: str  # "keyrings" or "keyrings/status"
    verb: str
    namespaced: bool = False  # True: only in the operator's namespace (the Role)
    name: str = ""  # a resourceName the rule is limited to

    def describe(self) -> str:
        group = f".{self.group}" if self.group else ""
        name = f"/{self.name}" if self.name else ""
        where = " in its namespace" if self.namespaced else ""
        return f"{self.verb} {self.resource}{group}{name}{where}"


def _rule(group: str, resources: str, verbs: str) -> list[Permission]:
    return [Permission(group, r, v) for r in resources.split() for v in verbs.split()]


def operator_permissions(lease_name: str = "kustody-operator") -> list[Permission]:
    """Every (group, resource, verb) the operator uses, cluster-wide unless ``namespaced``."""
    return [
        *_rule("kustody.io", "keyrings datakeys rotationpolicies escrowagents", "get list watch"),
        *_rule("kustody.io", "keyrings", "patch"),
        *_rule(
            "kustody.io",
            "keyrings/status datakeys/status rotationpolicies/status escrowagents/status",
            "patch",
        ),
        *_rule("kustody.io", "datakeys/finalizers", "update"),
        *_rule("", "secrets", "get list watch create patch"),
        *_rule("", "namespaces", "get list watch"),
        *_rule("", "events", "create"),
        *_rule("apps", "deployments statefulsets daemonsets", "get patch"),
        *_rule("apiextensions.k8s.io", "customresourcedefinitions", "get list watch"),
        Permission("coordination.k8s.io", "leases", "create", namespaced=True),
        Permission("coordination.k8s.io", "leases", "get", namespaced=True, name=lease_name),
        Permission("coordination.k8s.io", "leases", "update", namespaced=True, name=lease_name),
    ]
