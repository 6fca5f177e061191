"""``kustody doctor``: check a cluster's Kustody end to end and say what to fix.

Exit code 0 when everything checked is fine, 1 with warnings, 2 with errors.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from kustody.cli import certificate, checks, keyrings, output, target
from kustody.cli.finding import ERROR, OK, SKIPPED, WARNING, Finding, Options
from kustody.cli.report import API_VERSION
from kustody.domain.timestamps import format_time
from kustody.errors import UserError

_CHECKOUT_CRDS = Path(__file__).resolve().parents[3] / "crds"
_EXIT = {OK: 0, SKIPPED: 0, WARNING: 1, ERROR: 2}


def build_report(findings: Sequence[Finding], now: dt.datetime) -> dict[str, Any]:
    counts = {s: sum(1 for f in findings if f.status == s) for s in (OK, WARNING, ERROR, SKIPPED)}
    return {
        "apiVersion": API_VERSION,
        "kind": "DoctorReport",
        "generatedAt": format_time(now),
        "summary": {
            "ok": counts[OK],
            "warnings": counts[WARNING],
            "errors": counts[ERROR],
            "skipped": counts[SKIPPED],
        },
        "exitCode": max((_EXIT[f.status] for f in findings), default=0),
        "findings": [f.as_dict() for f in findings],
    }


def render(report: Mapping[str, Any], wide: bool = False) -> str:
    lines = []
    for f in report["findings"]:
        where = f"  [{f['object']}]" if wide and f["object"] else ""
        lines.append(f"{f['status'].upper():<8} {f['check']:<12} {f['message']}{where}")
        if f["fix"] and f["status"] != OK:
            lines.append(f"{'':<8} {'':<12} fix: {f['fix']}")
    s = report["summary"]
    lines.append(
        f"\n{s['errors']} error(s), {s['warnings']} warning(s), {s['ok']} ok, "
        f"{s['skipped']} skipped (exit {report['exitCode']})"
    )
    return "\n".join(lines)


def _hsm_target(args: argparse.Namespace) -> tuple[Callable[[], Any] | None, str]:
    """How to reach the sidecar (a client factory: gRPC channels belong to the event loop that
    uses them) and where it is, or no factory when there is nothing to check."""
    from kustody.api.client import HsmClient

    timeout = args.hsm_timeout
    if args.hsm_endpoint:
        missing = [f for f in ("hsm_tls_cert", "hsm_tls_key", "hsm_tls_ca") if not getattr(args, f)]
        if missing:
            flags = ", ".join("--" + f.replace("_", "-") for f in missing)
            raise UserError(f"--hsm-endpoint needs mutual TLS: also give {flags}")
        try:
            ca, cert, key = (
                p.read_bytes() for p in (args.hsm_tls_ca, args.hsm_tls_cert, args.hsm_tls_key)
            )
        except OSError as exc:
            raise UserError(f"cannot read a TLS file: {exc}") from None
        endpoint, name = args.hsm_endpoint, args.hsm_server_name
        return (
            lambda: HsmClient.tcp(
                endpoint, ca=ca, cert=cert, key=key, server_name=name, timeout=timeout
            ),
            endpoint,
        )
    socket = args.hsm_socket or Path(os.environ.get("KUSTODY_HSM_SOCKET", "/run/kustody/hsm.sock"))
    if args.hsm_socket is None and not socket.exists():
        return None, str(socket)
    return (lambda: HsmClient.unix(socket, timeout=timeout)), str(socket)


async def diagnose(
    args: argparse.Namespace, opts: Options, hsm: Callable[[], Any] | None
) -> list[Finding]:
    from kustody.kube.errors import KubeError
    from kustody.kube.resources import DATAKEYS, KEYRINGS

    kube = target.connect(args)
    opts.hsm = hsm() if hsm is not None else None
    try:
        try:
            crd_findings, present = await checks.check_crds(kube, opts)
        except KubeError as exc:
            raise UserError(f"cannot reach the API server: {exc}") from None
        findings = list(crd_findings)
        findings += await checks.check_lease(kube, opts)
        rings: list[Any] = []
        datakeys: list[Any] = []
        if "keyrings.kustody.io" in present:
            rings = await kube.list(KEYRINGS)
        if "datakeys.kustody.io" in present:
            datakeys = await kube.list(DATAKEYS)
        findings += await checks.check_sidecar(rings, opts)
        findings += await checks.check_rbac(kube, opts)
        findings += await asyncio.to_thread(certificate.check_certificate, opts)
        if "keyrings.kustody.io" in present:
            findings += keyrings.check_keyrings(rings, opts)
        else:
            findings.append(
                Finding("keyrings", SKIPPED, "KeyRings not checked: their CRD is missing")
            )
        if "datakeys.kustody.io" in present:
            findings += keyrings.check_datakeys(datakeys)
        return findings
    finally:
        kube.close()
        if opts.hsm is not None:
            await opts.hsm.close()


def _doctor(args: argparse.Namespace) -> int:
    hsm, where = _hsm_target(args)
    opts = Options(
        namespace=args.namespace,
        lease_name=args.lease_name,
        service_account=args.service_account,
        crds_dir=args.crds or (_CHECKOUT_CRDS if _CHECKOUT_CRDS.is_dir() else None),
        hsm_where=where,
        unwrap_endpoint=args.unwrap_endpoint,
        unwrap_cert=args.unwrap_cert,
        unwrap_names=args.unwrap_name or (),
        cert_warn=dt.timedelta(days=args.cert_warn_days),
        destroy_window=dt.timedelta(days=args.destroy_window_days),
    )
    findings = asyncio.run(diagnose(args, opts, hsm))
    data = build_report(findings, opts.now)
    print(output.render(data, args.output, lambda wide: render(data, wide)))
    return int(data["exitCode"])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "doctor",
        help="check Kustody in a cluster end to end and say what to fix (exit 0/1/2)",
        description="Check Kustody in a cluster end to end: the CRDs, the operator's Lease, "
        "the HSM sidecar (token present and logged in, KEKs matching their status "
        "fingerprints), the operator's RBAC, the unwrap service's certificate, KeyRings not "
        "Ready, destructions in the next days and overdue rotations. Each finding says what to "
        "fix. Exit code: 0 all ok, 1 warnings, 2 errors.",
    )
    cluster = p.add_argument_group("cluster (as in kubectl)")
    cluster.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
    )
    cluster.add_argument("--context", help="kubeconfig context to use (default: the current one)")
    cluster.add_argument(
        "-n",
        "--namespace",
        default="kustody-system",
        help="namespace Kustody runs in: its Lease and ServiceAccount (default: %(default)s)",
    )
    p.add_argument("--lease-name", default="kustody-operator", help="default: %(default)s")
    p.add_argument(
        "--service-account",
        default="kustody",
        help="the operator's ServiceAccount, whose RBAC is checked (default: %(default)s)",
    )
    p.add_argument(
        "--crds",
        type=Path,
        help="compare the installed CRDs with these files (default: the checkout's crds/)",
    )
    hsm = p.add_argument_group("HSM sidecar")
    hsm.add_argument(
        "--hsm-socket",
        type=Path,
        help="its unix socket (default: $KUSTODY_HSM_SOCKET or /run/kustody/hsm.sock, "
        "checked when it exists)",
    )
    hsm.add_argument("--hsm-endpoint", metavar="HOST:PORT", help="a remote kustody hsm (mTLS)")
    hsm.add_argument("--hsm-tls-cert", type=Path, help="client certificate for --hsm-endpoint")
    hsm.add_argument("--hsm-tls-key", type=Path, help="client key for --hsm-endpoint")
    hsm.add_argument("--hsm-tls-ca", type=Path, help="CA that signed the remote's certificate")
    hsm.add_argument("--hsm-server-name", help="expected name in the remote's certificate")
    hsm.add_argument("--hsm-timeout", type=float, default=5.0, help="seconds per call")
    unwrap = p.add_argument_group("unwrap service certificate")
    unwrap.add_argument(
        "--unwrap-endpoint", metavar="HOST:PORT", help="read the certificate it presents"
    )
    unwrap.add_argument("--unwrap-cert", type=Path, help="or check this PEM file")
    unwrap.add_argument(
        "--unwrap-name",
        action="append",
        metavar="NAME",
        help="a name workloads dial, which the certificate must carry (repeatable; default: "
        "the host of --unwrap-endpoint)",
    )
    p.add_argument(
        "--cert-warn-days", type=int, default=30, help="warn this long before expiry (default: 30)"
    )
    p.add_argument(
        "--destroy-window-days",
        type=int,
        default=7,
        help="warn of destructions due within this many days (default: 7)",
    )
    output.add_output_flag(p)
    p.set_defaults(func=_doctor)
