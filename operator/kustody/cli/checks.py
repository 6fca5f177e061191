"""The checks of ``kustody doctor`` that ask the API server and the HSM sidecar: CRDs, the
operator's Lease, the sidecar's token and KEKs, the operator's RBAC.

Each returns :class:`~kustody.cli.finding.Finding` values; ``ok``, ``warning`` and ``error``
decide the exit code, ``skipped`` says what was not looked at and how to include it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kustody.cli.finding import ERROR, OK, SKIPPED, WARNING, Finding, Options
from kustody.cli.rbac import Permission, operator_permissions
from kustody.cli.report import age
from kustody.domain.timestamps import parse_time

if TYPE_CHECKING:
    from kustody.kube.api import Kube

CRD_NAMES = (
    "keyrings.kustody.io",
    "datakeys.kustody.io",
    "rotationpolicies.kustody.io",
    "escrowagents.kustody.io",
)
EXPECTED_VERSION = "v1alpha1"


# -- CRDs ------------------------------------------------------------------------------------


def _bundled_crds(directory: Path | None) -> dict[str, Any]:
    if directory is None or not directory.is_dir():
        return {}
    found: dict[str, Any] = {}
    for path in sorted(directory.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "CustomResourceDefinition":
                found[doc["metadata"]["name"]] = doc
    return found


def _schemas(crd: Mapping[str, Any]) -> dict[str, Any]:
    return {v["name"]: v.get("schema") for v in crd["spec"].get("versions") or ()}


async def check_crds(kube: Kube, opts: Options) -> tuple[list[Finding], set[str]]:
    """Each kustody.io CRD installed, Established, serving and storing v1alpha1, and (when the
    checkout's crds/ is at hand) the same schema as this Kustody's."""
    from kustody.kube.errors import NotFound

    findings: list[Finding] = []
    present: set[str] = set()
    bundled = _bundled_crds(opts.crds_dir)
    apply = "kubectl apply --server-side -f crds/ (or helm upgrade with crds.enabled=true)"
    for name in CRD_NAMES:
        try:
            crd = await kube.request(
                "GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}"
            )
        except NotFound:
            findings.append(Finding("crds", ERROR, f"CRD {name} is not installed", apply, name))
            continue
        versions = {v["name"]: v for v in crd["spec"].get("versions") or ()}
        want = versions.get(EXPECTED_VERSION) or {}
        established = any(
            c.get("type") == "Established" and c.get("status") == "True"
            for c in (crd.get("status") or {}).get("conditions") or ()
        )
        if not established:
            findings.append(Finding("crds", ERROR, f"CRD {name} is not Established", apply, name))
        elif not (want.get("served") and want.get("storage")):
            findings.append(
                Finding(
                    "crds",
                    ERROR,
                    f"CRD {name} does not serve and store {EXPECTED_VERSION} "
                    f"(has {', '.join(sorted(versions)) or 'no versions'})",
                    apply,
                    name,
                )
            )
        elif name in bundled and _schemas(bundled[name]) != _schemas(crd):
            present.add(name)
            findings.append(
                Finding(
                    "crds",
                    WARNING,
                    f"CRD {name} differs from {opts.crds_dir} (an older or newer Kustody)",
                    apply,
                    name,
                )
            )
        else:
            present.add(name)
    if len(present) == len(CRD_NAMES) and not findings:
        same = " and match crds/" if bundled else ""
        findings.append(
            Finding(
                "crds",
                OK,
                f"{len(CRD_NAMES)} CRDs Established, kustody.io/{EXPECTED_VERSION} served and "
                f"stored{same}",
            )
        )
    return findings, present


# -- the operator's Lease --------------------------------------------------------------------


async def check_lease(kube: Kube, opts: Options) -> list[Finding]:
    from kustody.kube.resources import LEASES

    where = f"{opts.namespace}/{opts.lease_name}"
    lease = await kube.get_or_none(LEASES, opts.lease_name, opts.namespace)
    fix = (
        f"check the operator's pod and its log (kubectl -n {opts.namespace} get pods "
        "-l app.kubernetes.io/name=kustody; kubectl logs POD -c operator)"
    )
    if lease is None:
        return [
            Finding(
                "operator",
                ERROR,
                f"no Lease {where}: the operator never became active here",
                fix + "; or pass -n/--lease-name where it runs",
                where,
            )
        ]
    spec = lease.get("spec") or {}
    holder = spec.get("holderIdentity")
    renewed = parse_time(spec.get("renewTime"))
    duration = float(spec.get("leaseDurationSeconds") or 15)
    if not holder or renewed is None:
        return [Finding("operator", ERROR, f"Lease {where} is held by no one", fix, where)]
    ago = (opts.now - renewed).total_seconds()
    if ago > duration:
        return [
            Finding(
                "operator",
                ERROR,
                f"Lease {where} held by {holder} was last renewed {age(renewed, opts.now)} ago "
                f"(lease duration {duration:.0f}s): the operator is stopped or stuck",
                fix,
                where,
            )
        ]
    return [
        Finding("operator", OK, f"Lease {where} held by {holder}, renewed {max(ago, 0):.0f}s ago")
    ]


# -- the HSM sidecar -------------------------------------------------------------------------

_HEALTH_FIX = {
    "TOKEN_NOT_FOUND": "the token is not present: check --token-label and the PKCS#11 module",
    "PIN_INCORRECT": "the sidecar cannot log in: the user PIN in its PIN file is wrong",
    "PIN_FILE_UNREADABLE": "the sidecar cannot read its PIN file: check the mounted Secret",
    "MODULE_UNAVAILABLE": "the PKCS#11 module cannot be loaded: check --module",
}


async def check_sidecar(keyrings: Sequence[Mapping[str, Any]], opts: Options) -> list[Finding]:
    from kustody.api.client import HsmError

    if opts.hsm is None:
        return [
            Finding(
                "sidecar",
                SKIPPED,
                f"no HSM sidecar at {opts.hsm_where}",
                "pass --hsm-socket PATH (or --hsm-endpoint HOST:PORT with --hsm-tls-*) to check it",
            )
        ]
    try:
        health = await opts.hsm.health()
    except HsmError as exc:
        return [
            Finding(
                "sidecar",
                ERROR,
                f"the HSM sidecar at {opts.hsm_where} does not answer ({exc.reason}: {exc})",
                "start the sidecar (the hsm container); its log says why it stopped",
                opts.hsm_where,
            )
        ]
    if not health.serving:
        return [
            Finding(
                "sidecar",
                ERROR,
                f"the HSM sidecar answers but is not serving: {health.reason} {health.message}",
                _HEALTH_FIX.get(health.reason, "see the sidecar's log"),
                opts.hsm_where,
            )
        ]
    findings: list[Finding] = []
    checked = 0
    for kr in keyrings:
        name = kr["metadata"]["name"]
        want = {
            int(v["version"]): str(v.get("fingerprint") or "")
            for v in (kr.get("status") or {}).get("versions") or ()
            if v.get("state") != "Destroyed" and v.get("fingerprint")
        }
        if not want:
            continue
        try:
            described = await opts.hsm.describe_key(name)
        except HsmError as exc:
            findings.append(
                Finding(
                    "sidecar",
                    ERROR,
                    f"KeyRing {name}: the token does not describe it ({exc.reason})",
                    "is this the token the operator uses? (--token-label, the token volume)",
                    f"keyring/{name}",
                )
            )
            continue
        have = {v.ref.version: v.fingerprint for v in described.versions}
        for version, fingerprint in sorted(want.items()):
            checked += 1
            if have.get(version) != fingerprint:
                found = have.get(version) or "no such version"
                findings.append(
                    Finding(
                        "sidecar",
                        ERROR,
                        f"KeyRing {name} v{version}: status fingerprint {fingerprint}, token "
                        f"has {found}",
                        "the sidecar holds another token than the one these KEKs were made in; "
                        "restore the token (docs/runbooks/disaster-recovery.md)",
                        f"keyring/{name}",
                    )
                )
    if not findings:
        findings.append(
            Finding(
                "sidecar",
                OK,
                f"serving at {opts.hsm_where}; token present and logged in; {checked} KEK "
                f"version(s) match their status fingerprints",
            )
        )
    return findings


# -- RBAC ------------------------------------------------------------------------------------


async def _allowed(kube: Kube, user: str, groups: list[str], p: Permission, ns: str) -> bool:
    resource, _, subresource = p.resource.partition("/")
    attributes: dict[str, str] = {"group": p.group, "resource": resource, "verb": p.verb}
    if subresource:
        attributes["subresource"] = subresource
    if p.namespaced:
        attributes["namespace"] = ns
    if p.name:
        attributes["name"] = p.name
    review = await kube.request(
        "POST",
        "/apis/authorization.k8s.io/v1/subjectaccessreviews",
        body={
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": {"user": user, "groups": groups, "resourceAttributes": attributes},
        },
        kind="SubjectAccessReview",
    )
    return bool((review.get("status") or {}).get("allowed"))


async def check_rbac(kube: Kube, opts: Options) -> list[Finding]:
    """Ask the API server, for each thing the operator does, whether its ServiceAccount may."""
    from kustody.kube.errors import KubeError
    from kustody.kube.resources import Resource

    sa = f"{opts.namespace}/{opts.service_account}"
    accounts = Resource("", "v1", "serviceaccounts", "ServiceAccount", namespaced=True)
    if await kube.get_or_none(accounts, opts.service_account, opts.namespace) is None:
        return [
            Finding(
                "rbac",
                SKIPPED,
                f"no ServiceAccount {sa} (the operator does not run in this cluster with the "
                "chart's identity)",
                "pass -n and --service-account of the operator's pod to check its RBAC",
            )
        ]
    user = f"system:serviceaccount:{opts.namespace}:{opts.service_account}"
    groups = ["system:serviceaccounts", f"system:serviceaccounts:{opts.namespace}"]
    groups.append("system:authenticated")
    needed = operator_permissions(opts.lease_name)
    try:
        answers = await asyncio.gather(
            *(_allowed(kube, user, groups, p, opts.namespace) for p in needed)
        )
    except KubeError as exc:
        return [
            Finding(
                "rbac",
                WARNING,
                f"cannot ask about {sa}'s permissions: {exc}",
                "run doctor as someone allowed to create subjectaccessreviews",
            )
        ]
    missing = [p for p, ok in zip(needed, answers, strict=True) if not ok]
    if not missing:
        return [Finding("rbac", OK, f"{sa} may do all {len(needed)} things the operator does")]
    return [
        Finding(
            "rbac",
            ERROR,
            f"{sa} may not {p.describe()}",
            "restore the chart's RBAC (helm upgrade; charts/kustody/templates/rbac.yaml)",
            f"serviceaccount/{sa}",
        )
        for p in missing
    ]
