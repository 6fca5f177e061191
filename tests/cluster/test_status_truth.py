"""Ready means done: a condition reports success only after the write it describes succeeded.

The API server itself refuses the operator's Secret writes here (a ValidatingAdmissionPolicy
denies Secrets in a labelled namespace), as a quota, a policy engine or a webhook would.
"""

from __future__ import annotations

import json

import pytest
from kustody.dev.controlplane import Cluster
from kustody_helpers import apply, condition, datakey, event_reasons, eventually, get, keyring

pytestmark = pytest.mark.usefixtures("kustody_operator")

DENY_LABEL = "kustody-test/deny-secrets"


def _deny_secrets(kube: Cluster, name: str) -> None:
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": name},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": ["secrets"],
                    }
                ],
                "namespaceSelector": {"matchLabels": {DENY_LABEL: "true"}},
            },
            "validations": [
                {"expression": "false", "message": "Secrets are frozen in this namespace"}
            ],
        },
    }
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": name},
        "spec": {"policyName": name, "validationActions": ["Deny"]},
    }
    apply(kube, json.dumps(policy))
    apply(kube, json.dumps(binding))


def test_a_refused_secret_write_is_not_ready_with_the_api_servers_reason(
    kube: Cluster, kube_namespace: str
) -> None:
    ns, name = kube_namespace, f"frozen-{kube_namespace}"
    _deny_secrets(kube, name)
    kube.kubectl("label", "namespace", ns, f"{DENY_LABEL}=true")
    # The policy is in force once a probe Secret is refused (policies load asynchronously).
    eventually(
        lambda: kube.kubectl(
            "-n", ns, "create", "secret", "generic", "probe", "--dry-run=server",
            check=False,
        ).returncode
        != 0,
        30,
        "the policy to be in force",
    )  # fmt: skip
    apply(kube, keyring(name, [ns]))
    apply(kube, datakey("blocked", ns, name))

    dk = eventually(
        lambda: (
            (o := get(kube, "datakey", "blocked", ns))
            and condition(o, "Ready").get("reason") == "SecretWriteFailed"
            and o
        ),
        60,
        "the refused write to show in Ready",
    )
    ready = condition(dk, "Ready")
    assert ready["status"] == "False"
    assert "Secrets are frozen in this namespace" in ready["message"]
    assert get(kube, "secret", "blocked-dek", ns) is None
    # The key itself was made and recorded before the Secret write: nothing is lost.
    assert dk["status"]["wrappedKey"].startswith("kustody:v1:")
    eventually(
        lambda: "SecretWriteFailed" in event_reasons(kube, ns, "blocked"), 30, "a Warning Event"
    )
    # Ready never claimed success while the Secret was missing.
    assert all(c.get("reason") != "KeyAvailable" for c in (dk["status"].get("conditions") or ()))

    # The cause goes away: the same key is published and only then Ready.
    kube.kubectl("delete", "validatingadmissionpolicybinding", name)
    done = eventually(
        lambda: (
            (o := get(kube, "datakey", "blocked", ns))
            and condition(o, "Ready").get("status") == "True"
            and o
        ),
        90,
        "the DataKey to recover once the write succeeds",
    )
    assert condition(done, "Ready")["reason"] == "KeyAvailable"
    secret = get(kube, "secret", "blocked-dek", ns) or {}
    assert done["status"]["wrappedKey"] == dk["status"]["wrappedKey"]
    assert secret["data"]["wrapped-key"]
    kube.kubectl("delete", "validatingadmissionpolicy", name)
    kube.kubectl("delete", "keyring", name, "--wait=false")
