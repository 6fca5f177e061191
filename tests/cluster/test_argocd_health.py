"""Argo CD health checks (examples/argocd/health/*.lua) run by a real Lua interpreter (lupa)
against status objects the real operator writes, captured live from the local control plane."""

from __future__ import annotations

import copy
import secrets
from pathlib import Path
from typing import Any

import pytest
from kustody.dev.controlplane import Cluster
from kustody_helpers import apply, condition, datakey, eventually, get, keyring, policy, ready

lupa = pytest.importorskip("lupa", reason="lupa is a test extra: pip install -e '.[test]'")

HEALTH = Path(__file__).resolve().parents[2] / "examples" / "argocd" / "health"
pytestmark = pytest.mark.usefixtures("kustody_operator")


def health(kind: str, obj: dict[str, Any]) -> tuple[str, str]:
    """Run the health script the way Argo CD does: a chunk with the object in global ``obj``."""
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(copy.deepcopy(obj), recursive=True)
    result = lua.execute((HEALTH / f"{kind}.lua").read_text())
    return str(result["status"]), str(result["message"])


def _settled(kube: Cluster, kind: str, name: str, ns: str | None, reason: str) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        obj = get(kube, kind, name, ns)
        return obj if condition(obj, "Ready").get("reason") == reason else None

    return eventually(check, 60, f"{kind} {name} Ready reason {reason}")


def test_health_of_real_objects(kube: Cluster, kube_namespace: str) -> None:
    suffix = secrets.token_hex(3)
    pol, ring, lonely = f"argo-{suffix}", f"argo-{suffix}", f"argo-nopolicy-{suffix}"
    apply(kube, policy(pol))
    apply(kube, keyring(ring, [kube_namespace], pol))
    apply(kube, keyring(lonely, [kube_namespace], f"missing-{suffix}"))
    apply(kube, datakey("good", kube_namespace, ring))
    apply(kube, datakey("orphan", kube_namespace, f"nowhere-{suffix}"))

    rp = eventually(lambda: (o := get(kube, "rotationpolicy", pol)) and ready(o) and o, 60, "rp")
    assert health("rotationpolicy", rp)[0] == "Healthy"

    kr = eventually(lambda: (o := get(kube, "keyring", ring)) and ready(o) and o, 60, "keyring")
    status, message = health("keyring", kr)
    assert status == "Healthy", message
    assert f"primary version {kr['status']['primaryVersion']}" in message

    dk = eventually(
        lambda: (o := get(kube, "datakey", "good", kube_namespace)) and ready(o) and o, 60, "dk"
    )
    status, message = health("datakey", dk)
    assert status == "Healthy", message
    assert "good-dek" in message

    missing_policy = _settled(kube, "keyring", lonely, None, "RotationPolicyNotFound")
    status, message = health("keyring", missing_policy)
    assert status == "Degraded"
    assert message.startswith("RotationPolicyNotFound: ")

    orphan = _settled(kube, "datakey", "orphan", kube_namespace, "KeyRingNotFound")
    status, message = health("datakey", orphan)
    assert status == "Degraded"
    assert message.startswith("KeyRingNotFound: ")

    # The same real objects, as Argo CD sees them before the operator caught up.
    for kind, obj in (("keyring", kr), ("datakey", dk), ("rotationpolicy", rp)):
        fresh = copy.deepcopy(obj)
        del fresh["status"]
        assert health(kind, fresh)[0] == "Progressing", kind
        stale = copy.deepcopy(obj)
        newer = obj["status"]["observedGeneration"] + 1
        stale["metadata"]["generation"] = newer
        expected = f"Waiting for the operator to observe generation {newer}"
        assert health(kind, stale) == ("Progressing", expected), kind

    for name in (ring, lonely):
        kube.kubectl("delete", "keyring", name, "--wait=false", check=False)
    kube.kubectl("delete", "rotationpolicy", pol, "--wait=false", check=False)


def test_namespace_not_allowed_is_degraded(kube: Cluster, kube_namespace: str) -> None:
    ring = f"argo-closed-{secrets.token_hex(3)}"
    apply(kube, keyring(ring, ["somewhere-else"]))
    apply(kube, datakey("outsider", kube_namespace, ring))
    obj = _settled(kube, "datakey", "outsider", kube_namespace, "NamespaceNotAllowed")
    status, message = health("datakey", obj)
    assert status == "Degraded"
    assert message.startswith("NamespaceNotAllowed: ")
    kube.kubectl("delete", "keyring", ring, "--wait=false", check=False)


def test_kustomize_example_syncs_healthy_and_without_drift(kube: Cluster, repo: Path) -> None:
    """What Argo CD / Flux do with examples/kustomize: apply, reach Healthy, stay in sync."""
    unit = str(repo / "examples" / "kustomize")
    kube.kubectl("apply", "--server-side", "-k", unit)
    for kind, name, ns in (
        ("rotationpolicy", "monthly", None),
        ("keyring", "orders", None),
        ("datakey", "orders-db", "orders"),
    ):
        obj = eventually(lambda k=kind, n=name, s=ns: (o := get(kube, k, n, s)) and ready(o) and o)
        assert health(kind, obj)[0] == "Healthy", (kind, obj.get("status"))
    kube.kubectl("apply", "--server-side", "-k", unit)
    diff = kube.kubectl("diff", "--server-side", "-k", unit, check=False)
    assert diff.returncode == 0, diff.stdout
