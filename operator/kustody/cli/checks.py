"""The checks of ``kustody doctor``: each looks at one part and says what to fix.

A check returns :class:`Finding` values; ``ok``, ``warning`` and ``error`` decide the exit
code, ``skipped`` says what was not looked at and how to include it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from kustody.cli.rbac import Permission, operator_permissions
from kustody.cli.report import age, rotation_overdue
from kustody.domain.timestamps import parse_time

if TYPE_CHECKING:
    from kustody.hsm.client import HsmClient
    from kustody.kube.api import Kube

OK, WARNING, ERROR, SKIPPED = "ok", "warning", "error", "skipped"
CRD_NAMES = ("keyrings.kustody.io", "datakeys.kustody.io", "rotationpolicies.kustody.io")
EXPECTED_VERSION = "v1alpha1"


@dataclass(frozen=True)
class Finding:
    check: str
    status: str
    message: str
    fix: str | None = None
    object: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "status": self.status,
            "message": self.message,
            "fix": self.fix,
            "object": self.object,
        }


@dataclass
class Options:
    namespace: str = "kustody-system"
    lease_name: str = "kustody-operator"
    service_account: str = "kustody"
    crds_dir: Path | None = None
    hsm: HsmClient | None = None
    hsm_where: str = ""
    unwrap_endpoint: str | None = None
    unwrap_cert: Path | None = None
    unwrap_names: Sequence[str] = ()
    cert_warn: dt.timedelta = dt.timedelta(days=30)
    destroy_window: dt.timedelta = dt.timedelta(days=7)
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


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
    start = "start the operator (kubectl -n {ns} get pods; kubectl -n {ns} logs deploy/...)"
    fix = start.format(ns=opts.namespace)
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
    from kustody.hsm.client import HsmError

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


# -- the unwrap service's certificate --------------------------------------------------------


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{endpoint!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def peer_certificate(endpoint: str, server_name: str | None, timeout: float = 5.0) -> bytes:
    """The certificate the server at ``endpoint`` presents. Only read, never trusted: no
    request is sent over this connection, so it is not verified here."""
    host, port = _split(endpoint)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])
    with (
        socket.create_connection((host, port), timeout) as raw,
        context.wrap_socket(raw, server_hostname=server_name or host) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    if not der:
        raise ssl.SSLError("no certificate presented")
    return der


def _names(cert: Any) -> set[str]:
    from cryptography import x509

    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(n) for n in san.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in san.get_values_for_type(x509.IPAddress)
    }


def _covers(names: set[str], wanted: str) -> bool:
    try:
        return str(ipaddress.ip_address(wanted)) in names
    except ValueError:
        pass
    if wanted in names:
        return True
    _, _, rest = wanted.partition(".")
    return bool(rest) and f"*.{rest}" in names


def check_certificate(opts: Options) -> list[Finding]:
    from cryptography import x509

    if opts.unwrap_cert is None and opts.unwrap_endpoint is None:
        return [
            Finding(
                "unwrap-cert",
                SKIPPED,
                "the unwrap service's certificate was not checked",
                "pass --unwrap-endpoint HOST:PORT (or --unwrap-cert FILE) to check it",
            )
        ]
    where = str(opts.unwrap_cert or opts.unwrap_endpoint)
    wanted = list(opts.unwrap_names)
    try:
        if opts.unwrap_cert is not None:
            cert = x509.load_pem_x509_certificate(opts.unwrap_cert.read_bytes())
        else:
            assert opts.unwrap_endpoint is not None
            server_name = wanted[0] if wanted else None
            cert = x509.load_der_x509_certificate(
                peer_certificate(opts.unwrap_endpoint, server_name)
            )
            if not wanted:
                wanted = [_split(opts.unwrap_endpoint)[0]]
    except (OSError, ValueError, ssl.SSLError) as exc:
        return [
            Finding(
                "unwrap-cert",
                ERROR,
                f"cannot read the unwrap service's certificate at {where}: {exc}",
                "is the unwrap service enabled and reachable (kubectl port-forward)?",
                where,
            )
        ]
    findings: list[Finding] = []
    after, before = cert.not_valid_after_utc, cert.not_valid_before_utc
    renew = "renew the serving certificate (cert-manager, or the Secret the chart mounts)"
    if after <= opts.now:
        findings.append(
            Finding(
                "unwrap-cert",
                ERROR,
                f"certificate expired {after:%Y-%m-%dT%H:%M:%SZ} ({age(after, opts.now)} ago): "
                "workloads cannot unwrap",
                renew,
                where,
            )
        )
    elif before > opts.now:
        findings.append(
            Finding(
                "unwrap-cert",
                ERROR,
                f"certificate not valid before {before:%Y-%m-%dT%H:%M:%SZ}",
                "check the clock of the issuer",
                where,
            )
        )
    elif after - opts.now < opts.cert_warn:
        findings.append(
            Finding(
                "unwrap-cert",
                WARNING,
                f"certificate expires {after:%Y-%m-%dT%H:%M:%SZ} (in {age(after, opts.now)})",
                renew,
                where,
            )
        )
    names = _names(cert)
    for name in wanted:
        if not _covers(names, name):
            findings.append(
                Finding(
                    "unwrap-cert",
                    ERROR,
                    f"certificate names {', '.join(sorted(names)) or 'nothing'}, not {name}: "
                    "workloads that dial that name refuse it",
                    "reissue it with that name in its subjectAltName",
                    where,
                )
            )
    if not findings:
        findings.append(
            Finding(
                "unwrap-cert",
                OK,
                f"certificate valid until {after:%Y-%m-%dT%H:%M:%SZ} "
                f"(in {age(after, opts.now)}), names {', '.join(sorted(names))}",
            )
        )
    return findings


# -- KeyRings and DataKeys -------------------------------------------------------------------


def _ready(obj: Mapping[str, Any]) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == "Ready":
            return dict(c)
    return {}


def check_keyrings(keyrings: Sequence[Mapping[str, Any]], opts: Options) -> list[Finding]:
    """KeyRings not Ready (with their reason), versions whose destruction is near, rotations
    that are overdue."""
    findings: list[Finding] = []
    for kr in keyrings:
        name = kr["metadata"]["name"]
        ready = _ready(kr)
        if ready.get("status") != "True":
            findings.append(
                Finding(
                    "keyrings",
                    ERROR,
                    f"KeyRing {name} is not Ready: {ready.get('reason') or 'Pending'}: "
                    f"{ready.get('message') or 'not reconciled yet'}",
                    f"kubectl describe keyring {name}",
                    f"keyring/{name}",
                )
            )
        impact = {
            int(i["version"]): i for i in (kr.get("status") or {}).get("destructionImpact") or ()
        }
        for v in (kr.get("status") or {}).get("versions") or ():
            when = parse_time(v.get("destroyAt"))
            if v.get("state") != "DestroyScheduled" or when is None:
                continue
            if when - opts.now <= opts.destroy_window:
                hit = impact.get(int(v["version"]))
                loses = (
                    f"; it would make {hit['dataKeys']} DataKey(s) and {hit['secrets']} "
                    "Secret(s) unreadable"
                    if hit
                    else ""
                )
                due = f"in {age(when, opts.now)}" if when > opts.now else "now (overdue)"
                findings.append(
                    Finding(
                        "destruction",
                        WARNING,
                        f"KeyRing {name} v{v['version']} will be destroyed {due} "
                        f"({v['destroyAt']}){loses}",
                        f"if it is still needed: kustody restore {name} {v['version']}",
                        f"keyring/{name}",
                    )
                )
        if rotation_overdue(kr, opts.now):
            due_at = (kr.get("status") or {}).get("nextRotationAt")
            findings.append(
                Finding(
                    "rotation",
                    WARNING,
                    f"KeyRing {name}: rotation was due at {due_at} and has not happened",
                    "check the operator's log and the KeyRing's conditions "
                    f"(kubectl describe keyring {name})",
                    f"keyring/{name}",
                )
            )
    if not findings:
        findings.append(
            Finding(
                "keyrings",
                OK,
                f"{len(keyrings)} KeyRing(s) Ready; no destruction in the next "
                f"{opts.destroy_window.days} days; no rotation overdue",
            )
        )
    return findings


def check_datakeys(datakeys: Sequence[Mapping[str, Any]]) -> list[Finding]:
    bad = [d for d in datakeys if _ready(d).get("status") != "True"]
    if not bad:
        return [Finding("datakeys", OK, f"{len(datakeys)} DataKey(s) Ready")]
    findings = []
    for d in bad[:20]:
        ns, name = d["metadata"]["namespace"], d["metadata"]["name"]
        ready = _ready(d)
        findings.append(
            Finding(
                "datakeys",
                WARNING,
                f"DataKey {ns}/{name} is not Ready: {ready.get('reason') or 'Pending'}: "
                f"{ready.get('message') or 'not reconciled yet'}",
                f"kubectl describe datakey {name} -n {ns}",
                f"datakey/{ns}/{name}",
            )
        )
    if len(bad) > 20:
        findings.append(
            Finding(
                "datakeys", WARNING, f"... and {len(bad) - 20} more DataKeys not Ready",
                "kustody status -A",
            )
        )  # fmt: skip
    return findings
