"""Who may call which KeyService RPC, and whether plaintext may leave.

* The **unix socket** is trusted: it is shared only inside the pod (mode 0600), so its caller
  is the operator. Every RPC; plaintext export where the KeyRing allows it.
* **TCP** (``--listen``, mutual TLS) authorises each call by the client certificate's
  identity: its subjectAltName URIs and DNS names are looked up in an allow-list
  (``--client-roles FILE``) that maps identities to roles. An identity that is not listed, or
  a role that does not include the RPC, is refused with ``PERMISSION_DENIED``. Plaintext export
  is never available over TCP, whatever the request says (``PLAINTEXT_EXPORT_FORBIDDEN``).

The allow-list file is YAML (or JSON): a mapping from ``URI:<uri>`` or ``DNS:<name>`` to a role::

    "URI:spiffe://corp.example/kustody/operator": operator
    "DNS:kms-client.corp.example": kms
    "DNS:monitoring.corp.example": read-only
"""

from __future__ import annotations

import enum
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from cryptography import x509
from cryptography.x509.oid import NameOID

from kustody.api.errors import HsmError, Reason


class Role(enum.StrEnum):
    OPERATOR = "operator"  # every KeyService RPC (plaintext export still only on the socket)
    KMS = "kms"  # data-key calls a KMS-style client makes; no version lifecycle
    READ_ONLY = "read-only"  # Health, DescribeKey


_READ_ONLY = frozenset({"Health", "DescribeKey"})
_KMS = _READ_ONLY | {"GenerateDataKey", "BatchGenerateDataKey", "Decrypt"}
_OPERATOR = _KMS | {
    "ReWrap",
    "BatchReWrap",
    "CreateKeyVersion",
    "SetVersionState",
    "DestroyVersion",
    "ExportEscrow",
    "DescribeEscrowAgent",
}
RPCS: Mapping[Role, frozenset[str]] = {
    Role.OPERATOR: _OPERATOR,
    Role.KMS: _KMS,
    Role.READ_ONLY: _READ_ONLY,
}

_MAX_SHOWN = 200  # characters of an unknown identity quoted in a refusal


@dataclass(frozen=True)
class Caller:
    identity: str  # "unix", or the certificate identity ("URI:...", "DNS:...") it was matched by
    role: Role | None  # None: a remote certificate the allow-list does not name
    local: bool  # the pod-local unix socket


LOCAL = Caller("unix", Role.OPERATOR, local=True)


def parse_identity(text: str) -> str:
    """``URI:<uri>`` or ``DNS:<name>`` (prefix case-insensitive; DNS names compared lowercase)."""
    kind, sep, value = text.strip().partition(":")
    if not sep or not value or kind.upper() not in ("URI", "DNS"):
        raise ValueError(f"{text[:80]!r} is not 'URI:<uri>' or 'DNS:<name>'")
    if kind.upper() == "DNS":
        return f"DNS:{value.lower().rstrip('.')}"
    return f"URI:{value}"


class ClientRoles:
    """The allow-list: certificate identity → role."""

    def __init__(self, entries: Mapping[str, Role]) -> None:
        self.entries = {parse_identity(k): Role(v) for k, v in entries.items()}

    @classmethod
    def load(cls, path: Path) -> ClientRoles:
        """Read and check the file; ValueError says what is wrong with it."""
        try:
            data: Any = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ValueError(f"cannot read the client roles file {path}: {exc}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a mapping of 'URI:...'/'DNS:...' to a role")
        entries: dict[str, Role] = {}
        roles = ", ".join(r.value for r in Role)
        for key, value in data.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"{path}: {key!r}: identities and roles are strings")
            try:
                identity = parse_identity(key)
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from None
            try:
                entries[identity] = Role(value)
            except ValueError:
                raise ValueError(f"{path}: {key}: role {value!r} is not one of {roles}") from None
        return cls(entries)

    def match(self, identities: Sequence[str]) -> tuple[str, Role] | None:
        """The (identity, role) a certificate's identities map to; None if none is listed or
        the listed ones disagree on the role."""
        found = [(i, self.entries[i]) for i in identities if i in self.entries]
        if not found or len({role for _, role in found}) > 1:
            return None
        return found[0]


@functools.lru_cache(maxsize=256)
def certificate_identities(pem: bytes) -> tuple[tuple[str, ...], str]:
    """(SAN identities ``URI:...``/``DNS:...``, subject common name) of a PEM certificate."""
    cert = x509.load_pem_x509_certificate(pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        identities = tuple(
            [f"URI:{u}" for u in san.get_values_for_type(x509.UniformResourceIdentifier)]
            + [parse_identity(f"DNS:{d}") for d in san.get_values_for_type(x509.DNSName)]
        )
    except x509.ExtensionNotFound:
        identities = ()
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    common_name = str(names[0].value) if names else ""
    return identities, common_name


class Access(Protocol):
    def identify(self, context: Any) -> Caller: ...

    def check(self, caller: Caller, rpc: str) -> None: ...


class LocalAccess:
    """The pod-local unix socket: the operator, trusted with every RPC."""

    def identify(self, context: Any) -> Caller:
        return LOCAL

    def check(self, caller: Caller, rpc: str) -> None:
        return None


class CertificateAccess:
    """mTLS over TCP: the client certificate's identity must be in the allow-list, with a role
    that includes the RPC."""

    def __init__(self, roles: ClientRoles) -> None:
        self.roles = roles

    def identify(self, context: Any) -> Caller:
        auth = context.auth_context() or {}
        pems = auth.get("x509_pem_cert") or []
        if not pems:
            return Caller("no-client-certificate", None, local=False)
        try:
            identities, common_name = certificate_identities(bytes(pems[0]))
        except ValueError:
            return Caller("unparsable-client-certificate", None, local=False)
        match = self.roles.match(identities)
        if match is not None:
            return Caller(match[0], match[1], local=False)
        shown = ",".join(identities) or f"no URI/DNS subjectAltName (CN={common_name})"
        return Caller(shown[:_MAX_SHOWN], None, local=False)

    def check(self, caller: Caller, rpc: str) -> None:
        if caller.role is None:
            raise HsmError(
                Reason.PERMISSION_DENIED,
                f"client certificate {caller.identity} is not in the sidecar's allow-list "
                "(--client-roles), or its identities map to different roles",
            )
        if rpc not in RPCS[caller.role]:
            raise HsmError(
                Reason.PERMISSION_DENIED,
                f"{caller.identity} has role {caller.role}, which may not call {rpc}",
            )
