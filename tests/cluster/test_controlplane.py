"""The local control plane is a real Kubernetes: API, RBAC, GC, namespaces, tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from kubernetes import client
from kustody.dev.binaries import K8S_VERSION
from kustody.dev.controlplane import Cluster


def _eventually(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_version_reports_the_real_release(kube: Cluster) -> None:
    status, body = kube.get("/version")
    assert status == 200
    assert json.loads(body)["gitVersion"] == K8S_VERSION


def test_namespace_secret_and_crd(kube: Cluster, repo: Path) -> None:
    kube.kubectl("create", "namespace", "basics")
    kube.kubectl("-n", "basics", "create", "secret", "generic", "s1", "--from-literal=k=v")
    out = kube.kubectl("-n", "basics", "get", "secret", "s1", "-o", "jsonpath={.data.k}").stdout
    assert out == "dg=="  # base64 of "v"

    kube.kubectl("apply", "--server-side", "-f", str(repo / "crds"))
    crds = sorted(p.name for p in (repo / "crds").glob("*.yaml"))
    assert crds, "crds/ is empty"
    kube.kubectl("wait", "--for=condition=Established", "--timeout=60s", "crd", "--all")
    names = kube.kubectl("get", "crd", "-o", "jsonpath={.items[*].spec.group}").stdout.split()
    assert "kustody.io" in names


def test_owned_secret_is_garbage_collected(kube: Cluster, kube_namespace: str) -> None:
    core = client.CoreV1Api(kube.api_client())
    owner = core.create_namespaced_config_map(
        kube_namespace, {"metadata": {"name": "owner"}, "data": {"a": "b"}}
    )
    ref = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
        "blockOwnerDeletion": True,
    }
    core.create_namespaced_secret(
        kube_namespace,
        {"metadata": {"name": "owned", "ownerReferences": [ref]}, "stringData": {"k": "v"}},
    )
    core.delete_namespaced_config_map("owner", kube_namespace)

    def gone() -> bool:
        names = [s.metadata.name for s in core.list_namespaced_secret(kube_namespace).items]
        return "owned" not in names

    _eventually(gone, what="the garbage collector to delete the owned Secret")


def test_namespace_deletion_completes(kube: Cluster) -> None:
    core = client.CoreV1Api(kube.api_client())
    core.create_namespace({"metadata": {"name": "doomed"}})
    core.create_namespaced_secret("doomed", {"metadata": {"name": "s"}, "stringData": {"k": "v"}})
    core.delete_namespace("doomed")

    def deleted() -> bool:
        return "doomed" not in [n.metadata.name for n in core.list_namespace().items]

    _eventually(deleted, what="the namespace controller to finish deleting 'doomed'")


def test_serviceaccount_token_passes_tokenreview(kube: Cluster, kube_namespace: str) -> None:
    api = kube.api_client()
    core, auth = client.CoreV1Api(api), client.AuthenticationV1Api(api)
    core.create_namespaced_service_account(kube_namespace, {"metadata": {"name": "app"}})
    request = core.create_namespaced_service_account_token(
        "app",
        kube_namespace,
        {"spec": {"audiences": ["kustody"], "expirationSeconds": 600}},
    )
    token = request.status.token

    review = auth.create_token_review({"spec": {"token": token, "audiences": ["kustody"]}})
    assert review.status.authenticated is True
    assert review.status.user.username == f"system:serviceaccount:{kube_namespace}:app"
    assert review.status.audiences == ["kustody"]

    wrong_audience = auth.create_token_review({"spec": {"token": token, "audiences": ["vault"]}})
    assert not wrong_audience.status.authenticated

    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    assert not auth.create_token_review({"spec": {"token": forged}}).status.authenticated


def test_helm_lints_and_renders_the_chart(kube: Cluster, repo: Path) -> None:
    chart = str(repo / "charts" / "kustody")
    lint = kube.helm("lint", "--strict", chart)
    assert "0 chart(s) failed" in lint.stdout
    rendered = kube.helm("template", "kustody", chart, "--namespace", "kustody-system").stdout
    assert "kind: Deployment" in rendered
    kube.kubectl("create", "namespace", "kustody-system", check=False)
    dry_run = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert "deployment.apps/kustody created (server dry run)" in dry_run.stdout
