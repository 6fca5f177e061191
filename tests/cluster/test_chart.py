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
    assert "softhsm2-util --init-token" in spec["initContainers"][0]["args"][0]
    assert _one(docs, "Deployment")["spec"]["strategy"] == {"type": "Recreate"}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["token"]["persistentVolumeClaim"]["claimName"] == "kustody-token"
    assert volumes["pin"]["secret"]["secretName"] == "kustody-pin"
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
    assert volumes["unwrap-tls"]["secret"]["secretName"] == "unwrap-tls"
    unwrap = _one(docs, "Service", "kustody-unwrap")
    assert unwrap["spec"]["ports"][0]["targetPort"] == "unwrap"
    rules = _one(docs, "ClusterRole")["rules"]
    assert {
        "apiGroups": ["authentication.k8s.io"],
        "resources": ["tokenreviews"],
        "verbs": ["create"],
    } in rules


def _metric_names() -> set[str]:
    """Metric names as exposed: counters get ``_total``, histograms ``_bucket``."""
    names: set[str] = set()
    for module in ("handlers/metrics.py", "hsm/metrics.py"):
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
    ("kustody.io", "keyrings/status"): {"patch"},
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


def test_chart_crds_with_keep_survive_uninstall_and_the_operator_runs_under_chart_rbac(
    fresh_cluster: Cluster,
    make_softhsm_token: Callable[[str], SoftHSMToken],
    tmp_path: Path,
) -> None:
    cluster, ns, release = fresh_cluster, "kustody-system", "kustody"
    cluster.kubectl("create", "namespace", ns)
    install = cluster.helm("install", release, str(CHART), "--namespace", ns, "--no-hooks")
    assert "STATUS: deployed" in install.stdout
    cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s",
        "crd/keyrings.kustody.io", "crd/datakeys.kustody.io", "crd/rotationpolicies.kustody.io",
    )  # fmt: skip
    upgrade = cluster.helm("upgrade", release, str(CHART), "--namespace", ns, "--no-hooks")
    assert "REVISION: 2" in upgrade.stdout

    # The operator process, authenticated as the chart's ServiceAccount and nothing else.
    sidecar = Sidecar(tmp_path / "hsm", make_softhsm_token("kustody")).start()
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
        _get(cluster, "-n", "payments", "secret", "ledger-dek")
        assert "forbidden" not in operator.log().lower(), operator.log()[-3000:]
        lease = _get(cluster, "-n", ns, "lease", "kustody-operator")
        assert lease["spec"]["holderIdentity"]
    finally:
        operator.stop()
        sidecar.stop()

    cluster.helm("uninstall", release, "--namespace", ns, "--no-hooks")
    names = cluster.kubectl("get", "crd", "-o", "name").stdout.split()
    for crd in ("keyrings", "datakeys", "rotationpolicies"):
        assert f"customresourcedefinition.apiextensions.k8s.io/{crd}.kustody.io" in names
    assert _get(cluster, "keyring", "payments")["metadata"]["name"] == "payments"
    assert _get(cluster, "-n", "payments", "datakey", "ledger")["status"]["conditions"]
