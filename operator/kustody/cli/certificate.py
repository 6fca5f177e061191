"""``kustody doctor``'s look at the unwrap service's certificate: expiry and names."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from typing import Any

from kustody.cli.finding import ERROR, OK, SKIPPED, WARNING, Finding, Options
from kustody.cli.report import age


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
