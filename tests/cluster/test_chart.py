"""The Helm chart against the real local API server: lint, every ci/ scenario accepted by the
server (with Pod Security `restricted` warnings turned on), install / upgrade / uninstall, the
RBAC the operator gets, and the operator actually working under exactly that RBAC.

No kubelet runs here, so no pod starts: installs use ``--no-hooks`` and no ``--wait``, and the
tests assert the objects. The operator-under-chart-RBAC test runs the real ``kustody operator``
process on this machine with the chart's ServiceAccount token instead.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import re
import secrets
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kustody.dev.controlplane import Cluster, ControlPlane
from kustody.dev.softhsm import SoftHSMToken
from kustody.dev.stack import Operator, Sidecar

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "kustody"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RESTRICTED = (
    "pod-security.kubernetes.io/enforce=restricted",
    "pod-security.kubernetes.io/warn=restricted",
)


def _eventually(check: Callable[[], bool], timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def _render(kube: Cluster, *args: str, namespace: str = "kustody-system") -> list[dict[str, Any]]:
    out = kube.helm("template", "kustody", str(CHART), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def _one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _kinds(docs: list[dict[str, Any]]) -> list[str]:
    return sorted(d["kind"] for d in docs)


def _pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _one(docs, "Deployment")["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def restricted_namespace(kube: Cluster) -> Iterator[str]:
    name = f"chart-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, *RESTRICTED)
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture(scope="module")
def monitoring_crds(kube: Cluster) -> None:
    stub = ROOT / "tests" / "fixtures" / "monitoring-crds-stub.yaml"
    kube.kubectl("apply", "--server-side", "-f", str(stub))
    kube.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/servicemonitors.monitoring.coreos.com", "crd/prometheusrules.monitoring.coreos.com",
    )  # fmt: skip


# -- lint and render --------------------------------------------------------------------------


def test_helm_lint_strict_default_and_every_scenario(kube: Cluster) -> None:
    assert {p.name for p in SCENARIOS} >= {
        "default-values.yaml",
        "real-hsm-values.yaml",
        "remote-kms-values.yaml",
        "metrics-values.yaml",
    }
    lint = kube.helm("lint", "--strict", str(CHART))
    assert "0 chart(s) failed" in lint.stdout
    for scenario in SCENARIOS:
        lint = kube.helm("lint", "--strict", str(CHART), "-f", str(scenario))
        assert "0 chart(s) failed" in lint.stdout, scenario.name


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[p.stem for p in SCENARIOS])
def test_scenario_is_accepted_by_the_api_server_under_restricted(
    kube: Cluster, restricted_namespace: str, monitoring_crds: None, scenario: Path
) -> None:
    rendered = kube.helm(
        "template", "kustody", str(CHART), "--namespace", restricted_namespace,
        "-f", str(scenario), "--set", "crds.enabled=false",
    ).stdout  # fmt: skip
    result = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    assert "deployment.apps/kustody created (server dry run)" in result.stdout
    assert "PodSecurity" not in result.stderr, result.stderr
    assert "error" not in result.stderr.lower(), result.stderr


def test_default_render_including_crds_is_accepted(kube: Cluster) -> None:
    """What test_controlplane's smoke test applies, with the CRDs in it."""
    rendered = kube.helm("template", "kustody", str(CHART), "--namespace", "kustody-system").stdout
    kube.kubectl("create", "namespace", "kustody-system", check=False)
    result = kube.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered)
    for crd in ("keyrings", "datakeys", "rotationpolicies"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.kustody.io" in result.stdout


def test_rendered_crds_are_the_ones_in_crds(kube: Cluster) -> None:
    docs = _render(kube)
    crds = {d["metadata"]["name"]: d for d in docs if d["kind"] == "CustomResourceDefinition"}
    sources = [yaml.safe_load(p.read_text()) for p in sorted((ROOT / "crds").glob("*.yaml"))]
    assert sorted(crds) == sorted(s["metadata"]["name"] for s in sources)
    for source in sources:
        rendered = crds[source["metadata"]["name"]]
        assert rendered["metadata"].pop("annotations") == {"helm.sh/resource-policy": "keep"}
        assert rendered == source

    no_keep = _render(kube, "--set", "crds.keep=false")
    for d in no_keep:
        if d["kind"] == "CustomResourceDefinition":
            assert "annotations" not in d["metadata"]
    assert "CustomResourceDefinition" not in _kinds(_render(kube, "--set", "crds.enabled=false"))


def test_every_container_meets_pod_security_restricted(kube: Cluster) -> None:
    for args in ([], ["-f", str(CHART / "ci" / "real-hsm-values.yaml")]):
        spec = _pod_spec(_render(kube, *args))
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert pod["runAsUser"] != 0
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not spec.get("hostNetwork")
        assert not spec.get("hostPID")
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, c["name"]
            assert sc["readOnlyRootFilesystem"] is True, c["name"]
            assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
            assert sc["runAsNonRoot"] is True, c["name"]
            assert "privileged" not in sc
        assert not any("hostPath" in v for v in spec["volumes"])


def test_default_mode_softhsm_on_a_claim_with_an_init_container(kube: Cluster) -> None:
    docs = _render(kube)
    spec = _pod_spec(docs)
    assert [c["name"] for c in spec["containers"]] == ["operator", "hsm"]
    assert [c["name"] for c in spec["initContainers"]] == ["init-token"]
    assert spec["initContainers"][0]["command"] == ["python", "/etc/softhsm/init-token.py"]
    assert _one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["token"]["persistentVolumeClaim"]["claimName"] == "kustody-token"
    assert volumes["pin"]["secret"]["secretName"] == "kustody-pin"
    assert volumes["token-init-pins"]["secret"]["secretName"] == "kustody-pin"
    pvc = _one(docs, "PersistentVolumeClaim")
    assert pvc["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    conf = _one(docs, "ConfigMap")["data"]["softhsm2.conf"]
    assert "directories.tokendir = /var/lib/kustody/tokens" in conf
    hsm = spec["containers"][1]
    assert "--pin-file=/etc/kustody/pin/user-pin" in hsm["args"]
    assert {"name": "SOFTHSM2_CONF", "value": "/etc/softhsm/softhsm2.conf"} in hsm["env"]
    operator = spec["containers"][0]
    assert operator["args"][0] == "operator"
    assert "--hsm-socket=/run/kustody/hsm.sock" in operator["args"]
    assert "--namespace=kustody-system" in operator["args"]


def test_dev_scenario_puts_the_token_on_an_emptydir(kube: Cluster) -> None:
    docs = _render(kube, "-f", str(CHART / "ci" / "dev-values.yaml"))
    volumes = {v["name"]: v for v in _pod_spec(docs)["volumes"]}
    assert "emptyDir" in volumes["token"]
    assert "PersistentVolumeClaim" not in _kinds(docs)
    assert "NetworkPolicy" not in _kinds(docs)


def _leaves(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if isinstance(node, dict) and node:
        for key, value in node.items():
            yield from _leaves(value, (*path, str(key)))
    else:
        yield path, node


def test_pins_are_never_values_and_never_in_the_pod_spec(kube: Cluster) -> None:
    docs = _render(kube)
    pins = _one(docs, "Secret", "kustody-pin")["data"]
    assert set(pins) == {"user-pin", "so-pin"}
    decoded = {base64.b64decode(v).decode() for v in pins.values()}
    deployment = json.dumps(_one(docs, "Deployment"))
    for pin in decoded:
        assert len(pin) == 32
        assert pin not in deployment
    assert decoded.isdisjoint(
        base64.b64decode(v).decode() for v in _one(_render(kube), "Secret")["data"].values()
    ), "two renders without a cluster must not reuse PINs"
    leaves = list(_leaves(yaml.safe_load((CHART / "values.yaml").read_text())))
    assert leaves
    pin_leaves = [path for path, _ in leaves if re.search(r"pin$", path[-1], re.I)]
    assert pin_leaves == [], "a PIN must never be a chart value"
    refused = kube.helm(
        "template", "k", str(CHART), "--set", "hsm.softhsm.pin.userPin=1234", check=False
    )
    assert refused.returncode != 0
    assert "userPin" in refused.stderr
    with_existing = _render(kube, "--set", "hsm.softhsm.pin.existingSecret=my-pins")
    assert "Secret" not in _kinds(with_existing)
    volumes = {v["name"]: v for v in _pod_spec(with_existing)["volumes"]}
    assert volumes["pin"]["secret"]["secretName"] == "my-pins"


def test_real_hsm_mode_uses_the_module_and_the_pin_secret(kube: Cluster) -> None:
    docs = _render(kube, "-f", str(CHART / "ci" / "real-hsm-values.yaml"))
    spec = _pod_spec(docs)
    assert "initContainers" not in spec
    assert not {"PersistentVolumeClaim", "Secret", "ConfigMap"} & set(_kinds(docs))
    hsm = spec["containers"][1]
    assert "--module=/opt/hsm/lib/libvendorpkcs11.so" in hsm["args"]
    assert "--token-label=payments-partition" in hsm["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["pin"]["secret"] == {
        "secretName": "hsm-partition-pin",
        "defaultMode": 0o440,
        "items": [{"key": "pin", "path": "user-pin"}],
    }
    assert {"hsm-client", "hsm-config"} <= set(volumes)
    mounts = {m["name"] for m in hsm["volumeMounts"]}
    assert {"hsm-client", "hsm-config", "pin"} <= mounts
    failed = kube.helm("template", "k", str(CHART), "--set", "hsm.mode=pkcs11", check=False)
    assert "hsm.pkcs11.module is required" in failed.stderr


def test_remote_mode_has_no_token_and_no_sidecar(kube: Cluster) -> None:
    docs = _render(kube, "-f", str(CHART / "ci" / "remote-kms-values.yaml"))
    spec = _pod_spec(docs)
    assert [c["name"] for c in spec["containers"]] == ["operator"]
    assert "initContainers" not in spec
    assert not {"PersistentVolumeClaim", "Secret", "ConfigMap"} & set(_kinds(docs))
    args = spec["containers"][0]["args"]
    assert "--hsm-endpoint=kms.onprem.example.com:8443" in args
    assert not any(a.startswith("--hsm-socket") for a in args)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["remote-tls"]["secret"]["secretName"] == "kustody-remote-tls"
    egress = _one(docs, "NetworkPolicy")["spec"]["egress"]
    assert {"ports": [{"port": 8443, "protocol": "TCP"}]} in egress
    failed = kube.helm("template", "k", str(CHART), "--set", "hsm.mode=remote", check=False)
    assert "hsm.remote.endpoint is required" in failed.stderr


def test_unwrap_front_ends_follow_the_value_and_empty_leaves_the_flag_out(kube: Cluster) -> None:
    base = ("--set", "unwrap.enabled=true", "--set", "unwrap.tlsSecret=unwrap-tls")
    four = _pod_spec(_render(kube, *base, "--set", "unwrap.frontEnds=4"))["containers"][1]
    assert "--workload-front-ends=4" in four["args"]
    cores = _pod_spec(_render(kube, *base, "--set", "unwrap.frontEnds="))["containers"][1]
    assert not any(a.startswith("--workload-front-ends") for a in cores["args"])
    for wrong in ("0", "65", "many"):
        failed = kube.helm(
            "template", "k", str(CHART), *base, "--set", f"unwrap.frontEnds={wrong}", check=False
        )
        assert failed.returncode != 0
        assert "frontEnds" in failed.stderr, failed.stderr


def test_kms_and_unwrap_options(kube: Cluster) -> None:
    docs = _render(
        kube,
        "--set", "kms.enabled=true",
        "--set", "unwrap.enabled=true",
        "--set", "unwrap.tlsSecret=unwrap-tls",
    )  # fmt: skip
    spec = _pod_spec(docs)
    hsm = spec["containers"][1]
    assert "--kms-socket=/run/kustody-kms/kms.sock" in hsm["args"]
    assert "--kms-keyring=kubernetes-secrets" in hsm["args"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["kms-socket"]["hostPath"]["path"] == "/var/run/kustody-kms"
    assert {"name": "unwrap", "containerPort": 8443, "protocol": "TCP"} in hsm["ports"]
    assert "--workload-listen=0.0.0.0:8443" in hsm["args"]
    assert "--workload-front-ends=2" in hsm["args"]  # the chart's default (unwrap.frontEnds)
    assert volumes["unwrap-tls"]["secret"]["secretName"] == "unwrap-tls"
    unwrap = _one(docs, "Service", "kustody-unwrap")
    assert unwrap["spec"]["ports"][0]["targetPort"] == "unwrap"
    operator_rules = _flatten(_one(docs, "ClusterRole", "kustody")["rules"])
    assert ("authentication.k8s.io", "tokenreviews") not in operator_rules
    assert _flatten(_one(docs, "ClusterRole", "kustody-unwrap")["rules"]) == UNWRAP_RULES


def _metric_names() -> set[str]:
    """Metric names as exposed: counters get ``_total``, histograms ``_bucket``."""
    names: set[str] = set()
    for module in ("controller/metrics.py", "sidecar/metrics.py", "sidecar/unwrap/metrics.py"):
        source = (ROOT / "operator" / "kustody" / module).read_text()
        for kind, name in re.findall(
            r"(Counter|Histogram|GaugeMetricFamily)\(\s*\"(\w+)\"", source
        ):
            names |= {
                "Counter": {f"{name}_total"},
                "Histogram": {f"{name}_bucket", f"{name}_count", f"{name}_sum"},
                "GaugeMetricFamily": {name},
            }[kind]
    return names


def test_alerts_and_dashboard_use_metrics_that_exist(kube: Cluster) -> None:
    docs = _render(kube, "-f", str(CHART / "ci" / "metrics-values.yaml"))
    known = _metric_names()
    assert "kustody_hsm_token_up" in known
    rules = _one(docs, "PrometheusRule")["spec"]["groups"][0]["rules"]
    alerts = {r["alert"]: r for r in rules}
    assert {
        "KustodyRotationOverdue",
        "KustodyHSMUnreachable",
        "KustodyDataKeyNotReady",
        "KustodyDestructionScheduled",
    } <= set(alerts)
    for rule in rules:
        used = set(re.findall(r"kustody_\w+", rule["expr"]))
        assert used, rule["alert"]
        assert used <= known, f"{rule['alert']} uses unknown metrics {used - known}"
        assert rule["annotations"]["runbook_url"].endswith(".md")
        runbook = rule["annotations"]["runbook_url"].split("/blob/main/")[1]
        assert (ROOT / runbook).is_file(), runbook
    dashboard = json.loads(_one(docs, "ConfigMap", "kustody-dashboard")["data"]["kustody.json"])
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            used = set(re.findall(r"kustody_\w+", target["expr"]))
            assert used <= known, f"panel {panel['title']!r} uses unknown metrics {used - known}"
    monitor = _one(docs, "ServiceMonitor")
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics", "hsm-metrics"]
    service = _one(docs, "Service", "kustody-metrics")
    assert (
        monitor["spec"]["selector"]["matchLabels"].items()
        <= {**service["metadata"]["labels"]}.items()
    )


# -- install, upgrade, uninstall on the shared control plane ----------------------------------

EXPECTED_CLUSTER_RULES = {
    ("kustody.io", "keyrings"): {"get", "list", "watch", "patch"},
    ("kustody.io", "datakeys"): {"get", "list", "watch"},
    ("kustody.io", "rotationpolicies"): {"get", "list", "watch"},
    ("kustody.io", "escrowagents"): {"get", "list", "watch"},
    ("kustody.io", "keyrings/status"): {"patch"},
    ("kustody.io", "escrowagents/status"): {"patch"},
    ("kustody.io", "datakeys/status"): {"patch"},
    ("kustody.io", "rotationpolicies/status"): {"patch"},
    ("kustody.io", "datakeys/finalizers"): {"update"},
    ("", "secrets"): {"get", "list", "watch", "create", "patch"},
    ("", "namespaces"): {"get", "list", "watch"},
    ("", "events"): {"create"},
    ("apps", "deployments"): {"get", "patch"},
    ("apps", "statefulsets"): {"get", "patch"},
    ("apps", "daemonsets"): {"get", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"get", "list", "watch"},
}


UNWRAP_RULES = {
    ("authentication.k8s.io", "tokenreviews"): {"create"},
    ("kustody.io", "datakeys"): {"get"},
    ("kustody.io", "keyrings"): {"get"},
    ("", "namespaces"): {"get"},
}


def _flatten(rules: list[dict[str, Any]]) -> dict[tuple[str, str], set[str]]:
    out: dict[tuple[str, str], set[str]] = {}
    for rule in rules:
        assert "resourceNames" not in rule or rule["resourceNames"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                out.setdefault((group, resource), set()).update(rule["verbs"])
    return out


def _get(kube: Cluster, *args: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(kube.kubectl("get", *args, "-o", "json").stdout)
    return data


def test_install_upgrade_uninstall(kube: Cluster, kustody_crds: Path) -> None:
    ns, release = f"kustody-{secrets.token_hex(3)}", f"kc{secrets.token_hex(3)}"
    full = f"{release}-kustody"
    kube.kubectl("create", "namespace", ns)
    kube.kubectl("label", "namespace", ns, *RESTRICTED)
    common = (str(CHART), "--namespace", ns, "--no-hooks", "--set", "crds.enabled=false")
    install = kube.helm("install", release, *common)
    assert "STATUS: deployed" in install.stdout
    assert f"kubectl -n {ns} get deployment {full}" in install.stdout  # NOTES.txt

    deployment = _get(kube, "-n", ns, "deployment", full)
    assert deployment["spec"]["template"]["spec"]["serviceAccountName"] == full
    _get(kube, "-n", ns, "serviceaccount", full)
    _get(kube, "-n", ns, "networkpolicy", full)
    service = _get(kube, "-n", ns, "service", f"{full}-metrics")
    assert [p["name"] for p in service["spec"]["ports"]] == ["metrics", "hsm-metrics"]
    _get(kube, "-n", ns, "persistentvolumeclaim", f"{full}-token")
    pins_before = _get(kube, "-n", ns, "secret", f"{full}-pin")["data"]

    role = _get(kube, "clusterrole", full)
    assert _flatten(role["rules"]) == EXPECTED_CLUSTER_RULES
    binding = _get(kube, "clusterrolebinding", full)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": full, "namespace": ns}]
    lease_role = _get(kube, "-n", ns, "role", f"{full}-leader-election")
    assert _flatten(lease_role["rules"]) == {
        ("coordination.k8s.io", "leases"): {"create", "get", "update"}
    }

    sa = f"system:serviceaccount:{ns}:{full}"
    allowed = [
        ("list", "secrets", "--all-namespaces"),
        ("create", "secrets", "-n", "default"),
        ("patch", "keyrings.kustody.io", "--subresource=status"),
        ("patch", "datakeys.kustody.io", "-n", "default", "--subresource=status"),
        ("watch", "datakeys.kustody.io", "--all-namespaces"),
        ("create", "events", "-n", "default"),
        ("patch", "deployments.apps", "-n", "default"),
        ("get", "leases.coordination.k8s.io/kustody-operator", "-n", ns),
        ("update", "leases.coordination.k8s.io/kustody-operator", "-n", ns),
    ]
    denied = [
        ("delete", "secrets", "-n", "default"),
        ("update", "secrets", "-n", "default"),
        ("patch", "datakeys.kustody.io", "-n", "default"),
        ("create", "keyrings.kustody.io"),
        ("delete", "keyrings.kustody.io"),
        ("patch", "rotationpolicies.kustody.io"),
        ("create", "pods", "-n", "default"),
        ("get", "leases.coordination.k8s.io/kustody-operator", "-n", "default"),
        ("update", "leases.coordination.k8s.io/someone-else", "-n", ns),
        ("get", "configmaps", "-n", "default"),
        ("create", "tokenreviews.authentication.k8s.io"),
    ]
    for verb, *what in allowed:
        r = kube.kubectl("auth", "can-i", verb, *what, f"--as={sa}", check=False)
        assert r.stdout.strip() == "yes", (verb, what)
    for verb, *what in denied:
        r = kube.kubectl("auth", "can-i", verb, *what, f"--as={sa}", check=False)
        assert r.stdout.strip() == "no", (verb, what)

    upgrade = kube.helm("upgrade", release, *common, "--set", "operator.logLevel=debug")
    assert "REVISION: 2" in upgrade.stdout
    args = _get(kube, "-n", ns, "deployment", full)["spec"]["template"]["spec"]["containers"][0]
    assert "--log-level=debug" in args["args"]
    pins_after = _get(kube, "-n", ns, "secret", f"{full}-pin")["data"]
    assert pins_after == pins_before, "an upgrade must keep the token's PINs"

    uninstall = kube.helm("uninstall", release, "--namespace", ns, "--no-hooks")
    assert "uninstalled" in uninstall.stdout
    assert kube.kubectl("-n", ns, "get", "deployment", full, check=False).returncode != 0
    assert kube.kubectl("get", "clusterrole", full, check=False).returncode != 0
    # The token and its PINs outlive the release (helm.sh/resource-policy: keep).
    _get(kube, "-n", ns, "persistentvolumeclaim", f"{full}-token")
    assert _get(kube, "-n", ns, "secret", f"{full}-pin")["data"] == pins_before
    kube.kubectl("delete", "namespace", ns, "--wait=false")


# -- CRDs through the chart, on a control plane of its own ------------------------------------


@pytest.fixture(scope="module")
def fresh_cluster(kube: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second control plane: the shared one has the CRDs from crds/ under another owner."""
    plane = ControlPlane(
        tmp_path_factory.mktemp("chart-plane"), binaries=kube.binaries, log=lambda _: None
    )
    cluster = plane.start()
    try:
        yield cluster
    finally:
        plane.stop()


def _sa_cluster(cluster: Cluster, namespace: str, sa: str, state_dir: Path) -> Cluster:
    """The same cluster seen with the ServiceAccount's token (a kubeconfig in ``state_dir``)."""
    token = cluster.kubectl("create", "token", sa, "-n", namespace, "--duration=2h").stdout.strip()
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "sa", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "sa"
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "kubeconfig").write_text(yaml.safe_dump(config))
    return dataclasses.replace(cluster, state_dir=state_dir)


def _ready(cluster: Cluster, *args: str) -> bool:
    r = cluster.kubectl("get", *args, "-o", "json", check=False)
    if r.returncode != 0:
        return False
    conditions = json.loads(r.stdout).get("status", {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _init_token_as_the_chart_does(cluster: Cluster, ns: str, directory: Path) -> SoftHSMToken:
    """The installed release's init step, run here: its program (ConfigMap), its environment
    (Deployment) and the PINs the chart generated (Secret). The returned token's PIN file sits
    in a directory with the user PIN alone, as the sidecar's volume projects it."""
    import os
    import sys

    from kustody.dev.softhsm import find_module

    script = _get(cluster, "-n", ns, "configmap", "kustody-softhsm")["data"]["init-token.py"]
    pod = _get(cluster, "-n", ns, "deployment", "kustody")["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["initContainers"][0]["env"]}
    pins = _get(cluster, "-n", ns, "secret", "kustody-pin")["data"]
    (directory / "tokens").mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    for sub, keys in (("init-pin", ("so-pin", "user-pin")), ("pin", ("user-pin",))):
        (directory / sub).mkdir(mode=0o700)
        for key in keys:
            fd = os.open(directory / sub / key, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, base64.b64decode(pins[key]))
            os.close(fd)
    (directory / "init-token.py").write_text(script)
    run_env = {
        **os.environ,
        **env,
        "PKCS11_MODULE": str(find_module()),
        "PIN_DIR": str(directory / "init-pin"),
        "SOFTHSM2_CONF": str(conf),
    }
    result = subprocess.run(
        [sys.executable, str(directory / "init-token.py")],
        env=run_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return SoftHSMToken(
        directory, env["TOKEN_LABEL"], find_module(), conf,
        directory / "pin" / "user-pin", directory / "init-pin" / "so-pin",
    )  # fmt: skip


def _unwrap_pki(directory: Path) -> dict[str, Path]:
    """A CA and a serving certificate for 127.0.0.1 (what cert-manager would issue)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kustody-unwrap-ca")])
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kustody-unwrap")])
    valid = (now - dt.timedelta(minutes=5), now + dt.timedelta(hours=2))
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(valid[0]).not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(san, critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    pem = serialization.Encoding.PEM
    directory.mkdir(parents=True, exist_ok=True)
    paths = {n: directory / f"{n}.pem" for n in ("ca", "cert", "key")}
    paths["ca"].write_bytes(ca.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    paths["key"].write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return paths


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_chart_crds_with_keep_survive_uninstall_and_the_operator_runs_under_chart_rbac(
    fresh_cluster: Cluster, tmp_path: Path
) -> None:
    """The release as the chart wires it, minus the kubelet: the token initialised by the
    chart's init step with the chart's PINs; the sidecar with only the user PIN and, for the
    unwrap service, only the unwrap ServiceAccount's token; the operator with only its own
    token, under the chart's RBAC and admission policies (its Secret creates and restoring
    patches pass them); a workload unwraps its key."""
    from kustody.client import UnwrapClient

    cluster, ns, release = fresh_cluster, "kustody-system", "kustody"
    cluster.kubectl("create", "namespace", ns)
    install = cluster.helm("install", release, str(CHART), "--namespace", ns, "--no-hooks")
    assert "STATUS: deployed" in install.stdout
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/keyrings.kustody.io", "crd/datakeys.kustody.io", "crd/rotationpolicies.kustody.io",
    )  # fmt: skip
    upgrade = cluster.helm("upgrade", release, str(CHART), "--namespace", ns, "--no-hooks", *UNWRAP)
    assert "REVISION: 2" in upgrade.stdout

    token = _init_token_as_the_chart_does(cluster, ns, tmp_path / "token")
    assert sorted(p.name for p in token.pin_file.parent.iterdir()) == ["user-pin"]
    unwrap_sa = _as_token(cluster, _token_data(cluster, ns, "kustody-unwrap-token"), tmp_path / "u")
    pki = _unwrap_pki(tmp_path / "pki")
    sidecar = Sidecar(
        tmp_path / "hsm", token,
        workload_listen=f"127.0.0.1:{_free_port()}",
        workload_tls_cert=pki["cert"], workload_tls_key=pki["key"],
        kubeconfig=unwrap_sa.kubeconfig,
    ).start()  # fmt: skip
    # The operator process, authenticated as the chart's ServiceAccount and nothing else.
    as_sa = _sa_cluster(cluster, ns, release, tmp_path / "sa")
    operator = Operator(
        tmp_path / "operator", as_sa, sidecar.socket, extra_args=("--namespace", ns)
    )
    try:
        operator.start().wait_active()
        examples = ROOT / "examples"
        for name in ("rotationpolicy.yaml", "keyring.yaml", "datakeys.yaml"):
            cluster.kubectl("apply", "--server-side", "-f", str(examples / name))
        _eventually(lambda: _ready(cluster, "keyring", "payments"), 90, "KeyRing Ready")
        for dk in ("ledger", "card-vault"):
            _eventually(lambda dk=dk: _ready(cluster, "-n", "payments", "datakey", dk), 90, dk)
        published = _get(cluster, "-n", "payments", "secret", "ledger-dek")["data"]
        # An edited Secret is restored: the operator's patch passes the admission policy.
        edited = {"data": {"wrapped-key": base64.b64encode(b"edited").decode()}}
        cluster.kubectl(
            "-n", "payments", "patch", "secret", "ledger-dek", "--type=merge",
            "-p", json.dumps(edited),
        )  # fmt: skip
        _eventually(
            lambda: _get(cluster, "-n", "payments", "secret", "ledger-dek")["data"] == published,
            90, "the operator to restore ledger-dek",
        )  # fmt: skip
        log = operator.log().lower()
        assert "forbidden" not in log, operator.log()[-3000:]
        assert "denied" not in log, operator.log()[-3000:]
        lease = _get(cluster, "-n", ns, "lease", "kustody-operator")
        assert lease["spec"]["holderIdentity"]

        # A workload unwraps through the unwrap service, which holds only its own identity.
        cluster.kubectl("-n", "payments", "create", "serviceaccount", "ledger")
        caller = cluster.kubectl(
            "create", "token", "ledger", "-n", "payments", "--audience=kustody"
        ).stdout.strip()  # fmt: skip
        (tmp_path / "caller-token").write_text(caller)
        secret_dir = tmp_path / "ledger-dek"
        secret_dir.mkdir()
        for key, value in published.items():
            (secret_dir / key).write_bytes(base64.b64decode(value))
        with UnwrapClient(
            sidecar.workload_listen or "", ca_file=pki["ca"],
            token_file=tmp_path / "caller-token", attempts=1,
        ) as client:  # fmt: skip
            assert len(client.unwrap(secret_dir)) == 32
    finally:
        operator.stop()
        sidecar.stop()

    cluster.helm("uninstall", release, "--namespace", ns, "--no-hooks")
    names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    for crd in ("keyrings", "datakeys", "rotationpolicies"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.kustody.io" in names
    assert _get(cluster, "keyring", "payments")["metadata"]["name"] == "payments"
    assert _get(cluster, "-n", "payments", "datakey", "ledger")["status"]["conditions"]


# -- issue 9: a compromised container is not a compromised cluster ----------------------------

SA_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"
UNWRAP = ("--set", "unwrap.enabled=true", "--set", "unwrap.tlsSecret=unwrap-tls")


def _token_volumes(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Volumes that carry a ServiceAccount token: projected tokens and token Secrets."""
    out = {}
    for v in spec["volumes"]:
        sources = v.get("projected", {}).get("sources", [])
        if any("serviceAccountToken" in s for s in sources) or v["name"].endswith("-token"):
            out[v["name"]] = v
    return out


def _mounts(container: dict[str, Any]) -> dict[str, str]:
    return {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}


def _containers(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in spec["containers"] + spec.get("initContainers", [])}


def test_operator_token_reaches_only_the_operator_container(kube: Cluster) -> None:
    """Rendered: no automount; the operator's projected token in the operator container
    alone; the hsm container holds no token, or with unwrap only the unwrap SA's token."""
    remote = ["-f", str(CHART / "ci" / "remote-kms-values.yaml")]
    for args, hsm_token in (([], None), (list(UNWRAP), "unwrap-token"), (remote, None)):
        docs = _render(kube, *args)
        spec = _pod_spec(docs)
        assert spec["automountServiceAccountToken"] is False
        assert spec["serviceAccountName"] == "kustody"
        api_access = {v["name"]: v for v in spec["volumes"]}["kube-api-access"]["projected"]
        assert {"path": "token", "expirationSeconds": 3607} in [
            s.get("serviceAccountToken") for s in api_access["sources"]
        ]
        containers = _containers(spec)
        assert _mounts(containers["operator"])[SA_PATH] == "kube-api-access"
        for name, c in containers.items():
            if name != "operator":
                assert "kube-api-access" not in _mounts(c).values(), name
        if "hsm" in containers:
            assert _mounts(containers["hsm"]).get(SA_PATH) == hsm_token
        if "init-token" in containers:
            assert not set(_mounts(containers["init-token"]).values()) & set(_token_volumes(spec))
        if hsm_token:
            volume = _token_volumes(spec)[hsm_token]
            assert volume["secret"]["secretName"] == "kustody-unwrap-token"
            token_secret = _one(docs, "Secret", "kustody-unwrap-token")
            assert token_secret["type"] == "kubernetes.io/service-account-token"
            assert token_secret["metadata"]["annotations"] == {
                "kubernetes.io/service-account.name": "kustody-unwrap"
            }
            binding = _one(docs, "ClusterRoleBinding", "kustody-unwrap")
            assert binding["subjects"][0]["name"] == "kustody-unwrap"
        else:
            assert not [d for d in docs if d["metadata"]["name"].startswith("kustody-unwrap")]


def _pod_from(kube: Cluster, ns: str, deployment: str) -> dict[str, Any]:
    """The pod the API server would store for the Deployment (ServiceAccount admission
    included), created with --dry-run=server: no kubelet runs here."""
    template = _get(kube, "-n", ns, "deployment", deployment)["spec"]["template"]
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe", "labels": template["metadata"].get("labels", {})},
        "spec": template["spec"],
    }
    out = kube.kubectl(
        "-n", ns, "create", "--dry-run=server", "-o", "json", "-f", "-", input=json.dumps(pod)
    ).stdout  # fmt: skip
    result: dict[str, Any] = json.loads(out)
    return result


def _token_data(kube: Cluster, ns: str, secret: str) -> str:
    """The token kube-controller-manager writes into a service-account-token Secret."""

    def filled() -> bool:
        return "token" in (_get(kube, "-n", ns, "secret", secret).get("data") or {})

    _eventually(filled, 60, f"kube-controller-manager to fill {secret}")
    data = _get(kube, "-n", ns, "secret", secret)["data"]
    assert set(data) == {"token", "ca.crt", "namespace"}
    return base64.b64decode(data["token"]).decode()


def _as_token(cluster: Cluster, token: str, state_dir: Path) -> Cluster:
    """The same cluster seen with a bearer token (a kubeconfig in ``state_dir``)."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    config["users"] = [{"name": "sa", "user": {"token": token}}]
    for ctx in config["contexts"]:
        ctx["context"]["user"] = "sa"
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "kubeconfig").write_text(yaml.safe_dump(config))
    return dataclasses.replace(cluster, state_dir=state_dir)


@pytest.fixture(scope="module")
def unwrap_release(kube: Cluster, kustody_crds: Path) -> Iterator[tuple[str, str]]:
    """The chart installed with unwrap on, in a namespace enforcing `restricted`."""
    ns, release = f"kustody-{secrets.token_hex(3)}", f"ku{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", ns)
    kube.kubectl("label", "namespace", ns, *RESTRICTED)
    kube.helm(
        "install", release, str(CHART), "--namespace", ns, "--no-hooks",
        "--set", "crds.enabled=false", *UNWRAP,
    )  # fmt: skip
    yield ns, f"{release}-kustody"
    kube.helm("uninstall", release, "--namespace", ns, "--no-hooks", check=False)
    kube.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def test_sidecar_and_operator_have_separate_least_privilege_identities(
    kube: Cluster, unwrap_release: tuple[str, str], tmp_path: Path
) -> None:
    """Compromised hsm container: it holds only the unwrap identity, which can review tokens
    and read DataKeys, KeyRings and Namespaces but cannot read a Secret or write anything;
    the operator identity can no longer review tokens. Checked on the pod the API server would
    admit and with the real token kube-controller-manager issues."""
    ns, full = unwrap_release
    pod = _pod_from(kube, ns, full)
    containers = _containers(pod["spec"])
    assert pod["spec"]["automountServiceAccountToken"] is False
    # The ServiceAccount admission plugin injected no kube-api-access-xxxxx volume anywhere.
    assert [v["name"] for v in pod["spec"]["volumes"] if v["name"].startswith("kube-api")] == [
        "kube-api-access"
    ]
    assert _mounts(containers["operator"])[SA_PATH] == "kube-api-access"
    assert _mounts(containers["hsm"])[SA_PATH] == "unwrap-token"
    assert SA_PATH not in _mounts(containers["init-token"])

    token = _token_data(kube, ns, f"{full}-unwrap-token")
    as_unwrap = _as_token(kube, token, tmp_path / "unwrap")
    who = json.loads(as_unwrap.kubectl("auth", "whoami", "-o", "json").stdout)
    assert who["status"]["userInfo"]["username"] == f"system:serviceaccount:{ns}:{full}-unwrap"
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token},
    }
    reviewed = as_unwrap.kubectl(
        "create",
        "--validate=false",
        "-o",
        "json",
        "-f",
        "-",
        input=json.dumps(review),
        check=False,
    )
    assert reviewed.returncode == 0, reviewed.stderr
    assert json.loads(reviewed.stdout)["status"]["authenticated"] is True
    for verb, *what in [
        ("get", "datakeys.kustody.io", "-n", "default"),
        ("get", "keyrings.kustody.io"),
        ("get", "namespaces"),
        ("create", "tokenreviews.authentication.k8s.io"),
    ]:
        assert as_unwrap.kubectl("auth", "can-i", verb, *what).stdout.strip() == "yes", what
    for verb, *what in [
        ("get", "secrets", "-n", ns),
        ("list", "secrets", "--all-namespaces"),
        ("create", "secrets", "-n", "default"),
        ("list", "datakeys.kustody.io", "--all-namespaces"),
        ("patch", "datakeys.kustody.io", "-n", "default", "--subresource=status"),
        ("patch", "deployments.apps", "-n", "default"),
        ("update", "leases.coordination.k8s.io/kustody-operator", "-n", ns),
        ("create", "serviceaccounts/token", "-n", ns),
    ]:
        r = as_unwrap.kubectl("auth", "can-i", verb, *what, check=False)
        assert r.stdout.strip() == "no", (verb, what)
    refused = as_unwrap.kubectl("-n", ns, "get", "secret", f"{full}-pin", check=False)
    assert refused.returncode != 0
    assert "forbidden" in refused.stderr.lower()
    operator = f"system:serviceaccount:{ns}:{full}"
    r = kube.kubectl(
        "auth", "can-i", "create", "tokenreviews.authentication.k8s.io", f"--as={operator}",
        check=False,
    )  # fmt: skip
    assert r.stdout.strip() == "no"


def test_unwrap_network_policy_admits_labelled_namespaces_by_default(
    kube: Cluster, unwrap_release: tuple[str, str]
) -> None:
    """Pod in another namespace: the unwrap port is open only to namespaces labelled
    kustody.io/unwrap=true unless the installer explicitly chooses any peer ([])."""
    ns, full = unwrap_release
    labelled = [{"namespaceSelector": {"matchLabels": {"kustody.io/unwrap": "true"}}}]
    stored = _get(kube, "-n", ns, "networkpolicy", full)["spec"]["ingress"]
    unwrap_rule = [r for r in stored if r["ports"][0]["port"] == "unwrap"]
    assert unwrap_rule == [{"ports": [{"port": "unwrap", "protocol": "TCP"}], "from": labelled}]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["networkPolicy"]["unwrapFrom"] == labelled
    anyone = _render(kube, *UNWRAP, "--set-json", "networkPolicy.unwrapFrom=[]")
    rules = _one(anyone, "NetworkPolicy")["spec"]["ingress"]
    assert {"ports": [{"port": "unwrap", "protocol": "TCP"}]} in rules
    mine = [{"namespaceSelector": {"matchLabels": {"team": "payments"}}}]
    custom = _render(kube, *UNWRAP, "--set-json", f"networkPolicy.unwrapFrom={json.dumps(mine)}")
    rules = _one(custom, "NetworkPolicy")["spec"]["ingress"]
    assert {"ports": [{"port": "unwrap", "protocol": "TCP"}], "from": mine} in rules


def _forbidden_by_policy(result: subprocess.CompletedProcess[str], policy: str) -> bool:
    return result.returncode != 0 and f"ValidatingAdmissionPolicy '{policy}'" in result.stderr


KUSTODY_LABELS = {
    "app.kubernetes.io/managed-by": "kustody",
    "kustody.io/datakey": "ledger",
    "kustody.io/keyring": "payments",
    "kustody.io/keyring-version": "1",
}
DATAKEY_OWNER = {
    "apiVersion": "kustody.io/v1alpha1",
    "kind": "DataKey",
    "name": "ledger",
    "uid": "00000000-0000-4000-8000-000000000001",
    "controller": True,
    "blockOwnerDeletion": True,
}


def _kustody_secret(
    name: str,
    ns: str,
    *,
    labels: dict[str, str] | None = None,
    owners: list[dict[str, Any]] | None = None,
    type: str = "kustody.io/wrapped-key",
) -> dict[str, Any]:
    """A Secret as the operator writes it for DataKey ``ledger`` (or with the given parts)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": type,
        "metadata": {
            "name": name,
            "namespace": ns,
            "labels": KUSTODY_LABELS if labels is None else labels,
            "ownerReferences": [DATAKEY_OWNER] if owners is None else owners,
        },
        "data": {"wrapped-key": base64.b64encode(b"kustody:v1:...").decode()},
    }


def test_admission_policy_confines_what_the_operator_token_can_write(
    kube: Cluster, unwrap_release: tuple[str, str], tmp_path: Path
) -> None:
    """Stolen operator token: RBAC lets it create and patch Secrets and patch workloads
    anywhere; the chart's ValidatingAdmissionPolicies refuse everything but what the operator
    writes. The operator's own workload write (kustody.kube.workloads.restart) still works."""
    import asyncio

    from kustody.kube.api import Kube, load_api_client
    from kustody.kube.workloads import restart

    ns, full = unwrap_release
    secrets_policy, workloads_policy = f"{full}-operator-secrets", f"{full}-operator-workloads"
    keyrings_policy = f"{full}-operator-keyrings"
    tenant = f"tenant-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", tenant)
    kube.kubectl("-n", tenant, "create", "secret", "generic", "app-db", "--from-literal=pw=x")
    kube.kubectl("-n", tenant, "create", "deployment", "web", "--image=registry.example/web:1")
    # The workload opts in to restarts by this DataKey (item 11); the operator cannot add that.
    kube.kubectl(
        "-n", tenant, "annotate", "deployment", "web", "kustody.io/allow-rollout-restart=ledger"
    )  # fmt: skip
    token = kube.kubectl("create", "token", full, "-n", ns, "--duration=1h").stdout.strip()
    as_op = _as_token(kube, token, tmp_path / "operator")

    def create(obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return as_op.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)

    # The policies take a moment to be loaded by the API server.
    bare = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "loot", "namespace": tenant},
        "stringData": {"x": "y"},
    }
    _eventually(lambda: _forbidden_by_policy(create(bare), secrets_policy), 30, "the policy")
    for policy in (secrets_policy, workloads_policy, keyrings_policy):
        status = _get(kube, "validatingadmissionpolicy", policy).get("status") or {}
        assert not (status.get("typeChecking") or {}).get("expressionWarnings"), status

    unmanaged = {k: v for k, v in KUSTODY_LABELS.items() if not k.startswith("app.")}
    refused_secrets = {
        "no labels": _kustody_secret("s1", tenant, labels={}),
        "not managed by kustody": _kustody_secret("s2", tenant, labels=unmanaged),
        "no owner": _kustody_secret("s3", tenant, owners=[]),
        "owner not a DataKey": _kustody_secret(
            "s4", tenant, owners=[{**DATAKEY_OWNER, "apiVersion": "v1", "kind": "ConfigMap"}]
        ),
        "owner is another DataKey": _kustody_secret(
            "s5", tenant, labels={**KUSTODY_LABELS, "kustody.io/datakey": "other"}
        ),
        "owner not the controller": _kustody_secret(
            "s6", tenant, owners=[{**DATAKEY_OWNER, "controller": False}]
        ),
        "a ServiceAccount token Secret": _kustody_secret(
            "s7", tenant, type="kubernetes.io/service-account-token"
        ),
    }
    # A token for a powerful ServiceAccount, which the token controller would fill in.
    refused_secrets["a ServiceAccount token Secret"]["metadata"]["namespace"] = "kube-system"
    refused_secrets["a ServiceAccount token Secret"]["metadata"]["annotations"] = {
        "kubernetes.io/service-account.name": "namespace-controller"
    }
    for what, obj in refused_secrets.items():
        assert _forbidden_by_policy(create(obj), secrets_policy), what
    # Someone else's Secret cannot be taken over, changed or deleted.
    for patch in (
        {"data": {"pw": base64.b64encode(b"mine").decode()}},
        {"metadata": {"labels": {"app.kubernetes.io/managed-by": "kustody"}}},
        {"metadata": _kustody_secret("app-db", tenant)["metadata"]},
    ):
        r = as_op.kubectl(
            "-n", tenant, "patch", "secret", "app-db", "--type=merge", "-p", json.dumps(patch),
            check=False,
        )  # fmt: skip
        assert _forbidden_by_policy(r, secrets_policy), patch
    r = as_op.kubectl("-n", tenant, "delete", "secret", "app-db", check=False)
    assert r.returncode != 0
    assert "forbidden" in r.stderr.lower()
    # What the operator writes is admitted: the create, then a patch of data and labels. (A
    # real owner, or the garbage collector removes the Secret; its KeyRing does not exist, so
    # no running operator acts on it.)
    owner = {
        "apiVersion": "kustody.io/v1alpha1",
        "kind": "DataKey",
        "metadata": {"name": "ledger", "namespace": tenant},
        "spec": {"keyRingRef": {"name": f"absent-{secrets.token_hex(3)}"}, "secretName": "x"},
    }
    uid = json.loads(
        kube.kubectl("create", "-o", "json", "-f", "-", input=json.dumps(owner)).stdout
    )["metadata"]["uid"]
    created = create(_kustody_secret("ledger-dek", tenant, owners=[{**DATAKEY_OWNER, "uid": uid}]))
    assert created.returncode == 0, created.stderr
    rewrapped = {
        "metadata": {"labels": {"kustody.io/keyring-version": "2"}},
        "data": {"wrapped-key": base64.b64encode(b"kustody:v2:...").decode()},
    }
    ok = as_op.kubectl(
        "-n", tenant, "patch", "secret", "ledger-dek", "--type=merge", "-p",
        json.dumps(rewrapped), check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    steal = as_op.kubectl(
        "-n", tenant, "patch", "secret", "ledger-dek", "--type=json", "-p",
        json.dumps([{"op": "remove", "path": "/metadata/ownerReferences"}]), check=False,
    )  # fmt: skip
    assert _forbidden_by_policy(steal, secrets_policy)

    # Workloads: only pod-template annotations under dk.kustody.io/.
    def patch_web(ops: list[dict[str, Any]]) -> subprocess.CompletedProcess[str]:
        return as_op.kubectl(
            "-n", tenant, "patch", "deployment", "web", "--type=json", "-p", json.dumps(ops),
            check=False,
        )  # fmt: skip

    image = "/spec/template/spec/containers/0/image"
    annotations = "/spec/template/metadata/annotations"
    evil_image = {"op": "replace", "path": image, "value": "evil.example/miner:1"}
    for ops in (
        [evil_image],
        [{"op": "replace", "path": "/spec/replicas", "value": 0}],
        [{"op": "add", "path": "/spec/template/metadata/labels/evil", "value": "1"}],
        [{"op": "add", "path": "/metadata/labels/evil", "value": "1"}],
        [{"op": "add", "path": "/metadata/annotations/kustody.io~1allow-rollout-restart",
          "value": "ledger,other"}],
        [{"op": "add", "path": "/spec/template/spec/serviceAccountName", "value": "admin"}],
        [{"op": "add", "path": annotations,
          "value": {"dk.kustody.io/ledger": "2", "other.example/x": "1"}}],
        [{"op": "add", "path": annotations, "value": {}},
         {"op": "add", "path": f"{annotations}/dk.kustody.io~1ledger", "value": "2"},
         evil_image],
    ):  # fmt: skip
        assert _forbidden_by_policy(patch_web(ops), workloads_policy), ops
    sneaky = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "miner", "namespace": tenant},
        "spec": {
            "selector": {"matchLabels": {"a": "b"}},
            "template": {
                "metadata": {"labels": {"a": "b"}},
                "spec": {"containers": [{"name": "m", "image": "evil.example/m:1"}]},
            },
        },
    }
    applied = as_op.kubectl(
        "apply", "--server-side", "--field-manager=x", "-f", "-", input=json.dumps(sneaky),
        check=False,
    )  # fmt: skip
    assert applied.returncode != 0, "server-side apply must not create a workload"
    assert as_op.kubectl("-n", tenant, "delete", "deployment", "web", check=False).returncode

    # The operator's real rollout restart, as the operator's ServiceAccount, of each kind
    # (a DaemonSet's template change also bumps its deprecated.daemonset.template.generation
    # annotation server-side: still admitted).
    for kind, name in (("StatefulSet", "db"), ("DaemonSet", "agent")):
        kube.kubectl("create", "-f", "-", input=json.dumps({
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": {"name": name, "namespace": tenant,
                         "annotations": {"kustody.io/allow-rollout-restart": "ledger"}},
            "spec": {"selector": {"matchLabels": {"app": name}}, "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "c", "image": "registry.example/c:1"}]}}},
        }))  # fmt: skip

    async def operator_restart(kind: str, name: str, generation: int) -> bool:
        client = Kube(load_api_client(str(as_op.kubeconfig)))
        try:
            return await restart(client, tenant, kind, name, "ledger", generation)
        finally:
            client.close()

    for kind, name in (("Deployment", "web"), ("StatefulSet", "db"), ("DaemonSet", "agent")):
        assert asyncio.run(operator_restart(kind, name, 1)) is True, kind
        assert asyncio.run(operator_restart(kind, name, 2)) is True, kind
        template = _get(kube, "-n", tenant, kind.lower(), name)["spec"]["template"]
        assert template["metadata"]["annotations"] == {"dk.kustody.io/ledger": "2"}
    template = _get(kube, "-n", tenant, "deployment", "web")["spec"]["template"]
    assert template["spec"]["containers"][0]["image"] == "registry.example/web:1"
    # KeyRings: its finalizer, nothing else (GitOps owns spec).
    ring = f"chart-{secrets.token_hex(3)}"
    kube.kubectl("create", "-f", "-", input=json.dumps({
        "apiVersion": "kustody.io/v1alpha1", "kind": "KeyRing", "metadata": {"name": ring},
        "spec": {"algorithm": "AES256GCM", "allowedNamespaces": {"names": [tenant]}},
    }))  # fmt: skip

    def patch_ring(patch: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return as_op.kubectl(
            "patch", "keyring", ring, "--type=merge", "-p", json.dumps(patch), check=False
        )  # fmt: skip

    for patch in (
        {"spec": {"allowPlaintextExport": True}},
        {"spec": {"allowedNamespaces": {"selector": {}}}},
        {"metadata": {"labels": {"x": "y"}}},
    ):
        assert _forbidden_by_policy(patch_ring(patch), keyrings_policy), patch
    finalizer = patch_ring({"metadata": {"finalizers": ["kustody.io/test"]}})
    assert finalizer.returncode == 0, finalizer.stderr
    assert patch_ring({"metadata": {"finalizers": None}}).returncode == 0
    r = as_op.kubectl("delete", "keyring", ring, "--wait=false", check=False)
    assert r.returncode != 0
    kube.kubectl("delete", "keyring", ring, "--wait=false")

    # The policies bind the operator's ServiceAccount only: an admin's writes are untouched.
    admin = kube.kubectl(
        "-n", tenant, "patch", "deployment", "web", "--type=json",
        "-p", json.dumps([{**evil_image, "value": "registry.example/web:2"}]),
    )  # fmt: skip
    assert admin.returncode == 0
    kube.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


# -- issue 9: PINs ---------------------------------------------------------------------------


def test_token_init_keeps_pins_out_of_argv_env_and_the_sidecar(kube: Cluster) -> None:
    """Rendered: the SO PIN reaches only the init container, as a file; the sidecar's volume
    projects the user PIN alone; no container has a PIN in its command, args or env."""
    for args in ([], ["-f", str(CHART / "ci" / "real-hsm-values.yaml")], list(UNWRAP)):
        docs = _render(kube, *args)
        spec = _pod_spec(docs)
        pin_values = {
            base64.b64decode(v).decode()
            for d in docs
            if d["kind"] == "Secret" and d["metadata"]["name"] == "kustody-pin"
            for v in d["data"].values()
        }
        volumes = {v["name"]: v for v in spec["volumes"]}
        containers = _containers(spec)
        for name, c in containers.items():
            visible = json.dumps([c.get("command"), c.get("args"), c.get("env")])
            assert not any(p in visible for p in pin_values), name
            flags = [a for a in c.get("args", []) if re.search(r"pin", a, re.I)]
            assert flags in ([], ["--pin-file=/etc/kustody/pin/user-pin"]), (name, flags)
            env_names = {e["name"] for e in c.get("env", [])}
            assert not {n for n in env_names if "PIN" in n} - {"PIN_DIR"}, (name, env_names)
            assert "secretKeyRef" not in json.dumps(c.get("env", []) + c.get("envFrom", []))
            for mount in c.get("volumeMounts", []):
                secret = volumes[mount["name"]].get("secret", {})
                if secret.get("secretName") in ("kustody-pin", "hsm-partition-pin"):
                    keys = {i["key"] for i in secret.get("items", [])}
                    if name == "init-token":
                        assert keys == {"so-pin", "user-pin"}
                    else:
                        assert keys in ({"user-pin"}, {"pin"}), (name, keys)
        if "init-token" in containers:
            assert volumes["pin"]["secret"]["items"] == [{"key": "user-pin", "path": "user-pin"}]
            assert "token-init-pins" in _mounts(containers["init-token"]).values()
            assert "token-init-pins" not in _mounts(containers["hsm"]).values()


def test_chart_init_step_initialises_a_real_token_without_pins_in_argv_or_env(
    kube: Cluster, tmp_path: Path
) -> None:
    """The init container's program from the rendered ConfigMap, run as the container runs it
    against a real SoftHSM2 token directory: while it holds the PINs, /proc shows neither in
    its command line or environment; the token it makes opens with the SO PIN and serves the
    real sidecar from a directory holding only the user PIN."""
    import os
    import sys

    from kustody.dev.softhsm import find_module

    docs = _render(kube)
    script = _one(docs, "ConfigMap", "kustody-softhsm")["data"]["init-token.py"]
    init = _containers(_pod_spec(docs))["init-token"]
    env = {e["name"]: e["value"] for e in init["env"]}
    assert set(env) == {"TOKEN_LABEL", "PKCS11_MODULE", "PIN_DIR", "SOFTHSM2_CONF"}
    assert "args" not in init
    (tmp_path / "tokens").mkdir()
    conf = tmp_path / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tmp_path / 'tokens'}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = false\n"
    )
    (tmp_path / "init-token.py").write_text(script)
    pin_dir = tmp_path / "pin"
    pin_dir.mkdir()
    user_pin, so_pin = secrets.token_hex(16), secrets.token_hex(16)
    for name in ("so-pin", "user-pin"):
        os.mkfifo(pin_dir / name, 0o600)  # the program blocks on them: look at it meanwhile
    run_env = {
        **os.environ,
        **env,
        "PKCS11_MODULE": str(find_module()),
        "PIN_DIR": str(pin_dir),
        "SOFTHSM2_CONF": str(conf),
    }
    argv = [sys.executable, str(tmp_path / "init-token.py")]  # as `python /etc/softhsm/...`
    proc = subprocess.Popen(argv, env=run_env, stdout=subprocess.PIPE, text=True)
    try:
        with open(pin_dir / "so-pin", "w") as fifo:  # returns once the program opened it
            seen = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            seen += Path(f"/proc/{proc.pid}/environ").read_bytes()
            fifo.write(so_pin + "\n")
        with open(pin_dir / "user-pin", "w") as fifo:
            seen += Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            fifo.write(user_pin)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, out
    assert "initialised" in out
    for pin in (user_pin, so_pin):
        assert pin.encode() not in seen
        assert pin not in out
    # A second start finds the token and leaves it alone (the PIN files are not even read).
    again = subprocess.run(argv, env=run_env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "already initialised" in again.stdout

    only_user = tmp_path / "sidecar-pin"
    only_user.mkdir()
    (only_user / "user-pin").write_text(user_pin)
    token = SoftHSMToken(
        tmp_path, env["TOKEN_LABEL"], find_module(), conf, only_user / "user-pin",
        tmp_path / "no-so-pin-here",
    )  # fmt: skip
    Sidecar(tmp_path / "hsm", token).start().stop()
    (tmp_path / "so").write_text(so_pin)
    check = subprocess.run(
        [sys.executable, "-c",
         "import pathlib, pkcs11, sys; t = pkcs11.lib(sys.argv[1]).get_token(token_label="
         "sys.argv[2]); t.open(rw=True, so_pin=pathlib.Path(sys.argv[3]).read_text()).close();"
         "print('so ok')", str(find_module()), env["TOKEN_LABEL"], str(tmp_path / "so")],
        env={**os.environ, "SOFTHSM2_CONF": str(conf)}, capture_output=True, text=True,
    )  # fmt: skip
    assert check.stdout.strip() == "so ok", check.stderr


def test_admission_policy_allows_escrow_packages_and_datakey_adoption_only(
    kube: Cluster, unwrap_release: tuple[str, str], tmp_path: Path
) -> None:
    """Issue 12 under the chart's policies, with the operator's token: an escrow package may
    be created, unowned, in the release namespace only, and never changed; a Secret may get
    its DataKey's controller reference added (adoption of a restored Secret) only when it
    names that DataKey and has no other owner."""
    ns, full = unwrap_release
    policy = f"{full}-operator-secrets"
    tenant = f"adopt-{secrets.token_hex(3)}"
    kube.kubectl("create", "namespace", tenant)
    token = kube.kubectl("create", "token", full, "-n", ns, "--duration=1h").stdout.strip()
    as_op = _as_token(kube, token, tmp_path / "operator")

    def package(name: str, where: str, **extra: Any) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kustody.io/escrow-package",
            "metadata": {
                "name": name,
                "namespace": where,
                "labels": {
                    "app.kubernetes.io/managed-by": "kustody",
                    "kustody.io/escrow-package": "true",
                    "kustody.io/keyring": "payments",
                    "kustody.io/keyring-version": "1",
                    "kustody.io/escrow-agent": "agent-a",
                },
                **extra,
            },
            "stringData": {"package.json": "{}"},
        }

    def create(obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return as_op.kubectl("create", "-f", "-", input=json.dumps(obj), check=False)

    def patch(name: str, where: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return as_op.kubectl(
            "patch", "secret", name, "-n", where, "--type=merge", "-p", json.dumps(body),
            check=False,
        )  # fmt: skip

    _eventually(
        lambda: _forbidden_by_policy(create(package("p0", tenant)), policy), 30, "the policy"
    )
    owned = package("p1", ns, ownerReferences=[DATAKEY_OWNER])
    assert _forbidden_by_policy(create(owned), policy)
    made = create(package("p2", ns))
    assert made.returncode == 0, made.stderr
    assert _forbidden_by_policy(patch("p2", ns, {"metadata": {"labels": {"x": "y"}}}), policy)

    # A restored Secret (no owner) of DataKey ledger: adoptable by ledger, by nothing else.
    restored = _kustody_secret("ledger-dek", tenant, owners=[])
    kube.kubectl("create", "-f", "-", input=json.dumps(restored))
    other = {**DATAKEY_OWNER, "name": "other"}
    assert _forbidden_by_policy(
        patch("ledger-dek", tenant, {"metadata": {"ownerReferences": [other]}}), policy
    )
    adopted = patch("ledger-dek", tenant, {"metadata": {"ownerReferences": [DATAKEY_OWNER]}})
    assert adopted.returncode == 0, adopted.stderr
    # A Secret owned by something else is never taken over.
    foreign = _kustody_secret("web-dek", tenant, owners=[])
    foreign["metadata"]["labels"]["kustody.io/datakey"] = "web"
    kube.kubectl("-n", tenant, "create", "configmap", "web")
    uid = kube.kubectl("-n", tenant, "get", "configmap", "web", "-o", "jsonpath={.metadata.uid}")
    foreign["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "ConfigMap", "name": "web", "uid": uid.stdout.strip()}
    ]
    kube.kubectl("create", "-f", "-", input=json.dumps(foreign))
    web_owner = {**DATAKEY_OWNER, "name": "web"}
    assert _forbidden_by_policy(
        patch("web-dek", tenant, {"metadata": {"ownerReferences": [web_owner]}}), policy
    )
    kube.kubectl("delete", "namespace", tenant, "--wait=false", check=False)


def test_escrow_admission_job_alone_sees_the_so_pin(kube: Cluster, tmp_path: Path) -> None:
    """Issue 12: the admission ceremony as a one-shot Job. Only its container mounts the SO PIN
    (as a file, never env or argv); the Deployment's containers still see only the user PIN;
    the Job is accepted by the API server; a Job without public keys is refused at render."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    pem = (
        rsa.generate_private_key(public_exponent=65537, key_size=3072)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    values = tmp_path / "escrow.yaml"
    values.write_text(yaml.safe_dump({"escrow": {"admit": {
        "enabled": True, "publicKeys": {"agent-a": pem}}}}))  # fmt: skip
    docs = _render(kube, "-f", str(values))
    job = _one(docs, "Job")
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert "so-pin" not in json.dumps(container.get("env", []))
    assert "--so-pin-file" in " ".join(container["args"])
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["so-pin"]["secret"]["items"] == [{"key": "so-pin", "path": "so-pin"}]
    assert spec["automountServiceAccountToken"] is False
    deployment = _one(docs, "Deployment")["spec"]["template"]["spec"]
    for name, c in _containers(deployment).items():
        if name != "init-token":
            mounted = {m["name"] for m in c.get("volumeMounts", [])}
            assert "token-init-pins" not in mounted, name
    pin_volume = {v["name"]: v for v in deployment["volumes"]}["pin"]
    assert pin_volume["secret"]["items"] == [{"key": "user-pin", "path": "user-pin"}]
    agents = _one(docs, "ConfigMap", "kustody-escrow-agents")
    assert agents["data"] == {"agent-a.pem": pem}
    kube.kubectl("create", "namespace", "kustody-system", check=False)
    accepted = kube.kubectl(
        "apply", "--dry-run=server", "-n", "kustody-system", "-f", "-",
        input=yaml.safe_dump_all([job, agents]), check=False,
    )  # fmt: skip
    assert accepted.returncode == 0, accepted.stderr
    refused = kube.helm(
        "template", "k", str(CHART), "--set", "escrow.admit.enabled=true", check=False
    )
    assert refused.returncode != 0
    assert "publicKeys" in refused.stderr
