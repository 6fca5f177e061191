"""Key escrow to trusted third parties: agent keys, jurisdictions, escrow packages.

An escrow agent is an RSA public key (at least 3072 bits) with a jurisdiction (ISO 3166-1
alpha-2). The token's Security Officer admits the key (CKA_TRUSTED); only then will the token
wrap an escrowed KEK version under it. An escrow package is the result, a JSON document
(``kustody.io/escrow-package/v1``)::

    {"format": "kustody.io/escrow-package/v1",
     "agentFingerprint": "sha256:<hex of SHA-256 of the agent's DER SubjectPublicKeyInfo>",
     "keyRing": "payments", "version": 2,
     "label": "kustody:payments:v2", "objectId": "<hex CKA_ID>",
     "checkValue": "<KEK check value, hex: the KeyRing status fingerprint>",
     "mechanism": "CKM_RSA_PKCS_OAEP(SHA-1,MGF1-SHA-1)",
     "createdAt": "2026-12-02T04:00:00Z",
     "wrappedKey": "<base64 of C_WrapKey output>"}

Its fingerprint (``packageFingerprint``) is ``sha256:`` and the hex SHA-256 of the wrapped
bytes. Only the agent's private key opens it, inside the agent's own token (C_UnwrapKey).
Pure: no I/O.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

PACKAGE_FORMAT = "kustody.io/escrow-package/v1"
MECHANISM = "CKM_RSA_PKCS_OAEP(SHA-1,MGF1-SHA-1)"
MIN_KEY_BITS = 3072
# The token object of an admitted agent key: a public RSA key with this label prefix and the
# agent fingerprint's 32 digest bytes as CKA_ID.
AGENT_LABEL_PREFIX = "kustody-escrow:"


class EscrowError(ValueError):
    """An agent key or a package that cannot be used; the message says why (no secrets)."""


@dataclass(frozen=True)
class AgentKey:
    """An agent's RSA public key, checked."""

    der: bytes
    modulus: int
    exponent: int
    bits: int

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.der).digest()

    @property
    def fingerprint(self) -> str:
        return "sha256:" + self.digest.hex()

    @property
    def label(self) -> str:
        return AGENT_LABEL_PREFIX + self.digest.hex()[:32]


def parse_public_key(pem: str | bytes) -> AgentKey:
    """An RSA public key of at least :data:`MIN_KEY_BITS` bits, from PEM."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"PRIVATE KEY" in data:
        raise EscrowError("this is a private key; an EscrowAgent holds only a public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm):
        raise EscrowError("not a PEM public key (-----BEGIN PUBLIC KEY-----)") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise EscrowError("not an RSA public key")
    if key.key_size < MIN_KEY_BITS:
        raise EscrowError(f"the key has {key.key_size} bits; at least {MIN_KEY_BITS} are required")
    numbers = key.public_numbers()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return AgentKey(der, numbers.n, numbers.e, key.key_size)


def fingerprint_of(wrapped: bytes) -> str:
    return "sha256:" + hashlib.sha256(wrapped).hexdigest()


@dataclass(frozen=True)
class Package:
    agent_fingerprint: str
    key_ring: str
    version: int
    label: str
    object_id: bytes
    check_value: str
    mechanism: str
    created_at: str
    wrapped: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint_of(self.wrapped)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PACKAGE_FORMAT,
                "agentFingerprint": self.agent_fingerprint,
                "keyRing": self.key_ring,
                "version": self.version,
                "label": self.label,
                "objectId": self.object_id.hex(),
                "checkValue": self.check_value,
                "mechanism": self.mechanism,
                "createdAt": self.created_at,
                "wrappedKey": base64.b64encode(self.wrapped).decode("ascii"),
            },
            sort_keys=True,
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Package:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError):
            raise EscrowError("an escrow package is not JSON") from None
        if not isinstance(doc, dict) or doc.get("format") != PACKAGE_FORMAT:
            raise EscrowError(f"not a {PACKAGE_FORMAT} document")
        try:
            package = cls(
                agent_fingerprint=str(doc["agentFingerprint"]),
                key_ring=str(doc["keyRing"]),
                version=int(doc["version"]),
                label=str(doc["label"]),
                object_id=bytes.fromhex(str(doc["objectId"])),
                check_value=str(doc["checkValue"]),
                mechanism=str(doc["mechanism"]),
                created_at=str(doc["createdAt"]),
                wrapped=base64.b64decode(str(doc["wrappedKey"]), validate=True),
            )
        except (KeyError, ValueError, TypeError, binascii.Error) as exc:
            raise EscrowError(f"an escrow package field cannot be read: {exc}") from None
        if package.mechanism != MECHANISM:
            raise EscrowError(f"unknown package mechanism {package.mechanism!r}")
        return package


@dataclass(frozen=True)
class Refusal:
    """An agent a KeyRing names that gets nothing, and why (for the Escrowed condition)."""

    agent: str
    jurisdiction: str | None
    why: str

    def describe(self) -> str:
        where = f" (jurisdiction {self.jurisdiction})" if self.jurisdiction else ""
        return f"EscrowAgent {self.agent}{where}: {self.why}"


def refusals(
    agents: Iterable[str],
    allowed: Iterable[str],
    found: Mapping[str, Mapping[str, Any] | None],
) -> list[Refusal]:
    """Which named agents may not receive this KeyRing's packages.

    ``found``: the EscrowAgent objects by name (None: missing). An agent is refused if it does
    not exist, if its jurisdiction is not in ``allowed``, or if the token's Security Officer
    has not admitted its key (status.admitted)."""
    allowed_set = set(allowed)
    out: list[Refusal] = []
    for name in agents:
        obj = found.get(name)
        if obj is None:
            out.append(Refusal(name, None, "does not exist"))
            continue
        jurisdiction = str((obj.get("spec") or {}).get("jurisdiction") or "")
        status = obj.get("status") or {}
        if jurisdiction not in allowed_set:
            out.append(
                Refusal(
                    name,
                    jurisdiction,
                    f"jurisdiction {jurisdiction} is not in spec.escrow.allowedJurisdictions "
                    f"({', '.join(sorted(allowed_set))})",
                )
            )
        elif not status.get("admitted"):
            out.append(
                Refusal(
                    name,
                    jurisdiction,
                    "not admitted: the token's Security Officer has not imported its key as a "
                    "trusted wrapping key (kustody escrow admit)",
                )
            )
    return out


@dataclass(frozen=True)
class EscrowSpec:
    """KeyRing ``spec.escrow``."""

    agents: tuple[str, ...]
    allowed_jurisdictions: frozenset[str]

    @classmethod
    def parse(cls, raw: object) -> EscrowSpec | None:
        if raw is None:
            return None
        if not isinstance(raw, Mapping):
            raise EscrowError("spec.escrow must be an object")
        agents = raw.get("agents")
        allowed = raw.get("allowedJurisdictions")
        if not isinstance(agents, list) or not agents:
            raise EscrowError("spec.escrow.agents must name at least one EscrowAgent")
        if not isinstance(allowed, list) or not allowed:
            raise EscrowError("spec.escrow.allowedJurisdictions must name at least one country")
        return cls(tuple(str(a) for a in agents), frozenset(str(j) for j in allowed))


def package_secret_name(key_ring: str, version: int, agent: str) -> str:
    return f"kustody-escrow-{key_ring}-v{version}-{agent}"
