"""Escrow inside the token: admitted agent keys, wrapping for an agent, recovery.

Three holders, three secrets (docs/runbooks/escrow.md):

* the **Security Officer** (SO PIN) admits an agent: :func:`admit` imports the agent's RSA public
  key as a public token object with ``CKA_WRAP=true, CKA_TRUSTED=true``. Only an SO session can
  set ``CKA_TRUSTED``; the sidecar (user PIN) cannot.
* the **sidecar** (user PIN) creates escrowed KEK versions with ``CKA_EXTRACTABLE=true,
  CKA_WRAP_WITH_TRUSTED=true, CKA_SENSITIVE=true``; the token then wraps them only under a
  trusted key (:func:`wrap_for_agent`, ``C_WrapKey`` with RSA-OAEP SHA-1/MGF1-SHA-1, the only
  OAEP parameters SoftHSM2 accepts for wrapping). Any other wrapping key: the token answers
  ``CKR_KEY_NOT_WRAPPABLE``; a non-extractable KEK: ``CKR_KEY_UNEXTRACTABLE``.
* the **agent** (its private key, in its own token) recovers: :func:`recover` unwraps a package
  with ``C_UnwrapKey`` inside the token that holds the private key, into a KEK object with the
  original label, ID and check value, again extractable only under trusted keys, and marks it
  with a ``kustody-recovered`` data object so the sidecar's trust check accepts it.

Nothing here returns or logs key material: the KEK crosses the token boundary only as the
RSA-OAEP ciphertext, and the private key never leaves its token.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pkcs11.exceptions as p11
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass

from kustody.api.errors import HsmError, Reason
from kustody.domain.escrow import MECHANISM, AgentKey, Package
from kustody.domain.keyversion import KeyVersionRef, parse_label
from kustody.pkcs11.templates import KEK_TEMPLATE

ESCROW_APPLICATION = "kustody-escrow"  # data object: this KEK version was created for escrow
RECOVERED_APPLICATION = "kustody-recovered"  # data object: this KEK came from a package
OAEP_PARAMS = (Mechanism.SHA_1, MGF.SHA1, None)
# An escrowable KEK: as any KEK, but extractable, and then only under keys the Security
# Officer marked trusted (CKA_WRAP_WITH_TRUSTED).
KEK_TEMPLATE_ESCROW = {
    **KEK_TEMPLATE,
    Attribute.EXTRACTABLE: True,
    Attribute.WRAP_WITH_TRUSTED: True,
}


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _agent_of(public: Any) -> AgentKey | None:
    """The AgentKey of an RSA public key object (None if it is not one)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    try:
        n = int.from_bytes(bytes(public[Attribute.MODULUS]), "big")
        e = int.from_bytes(bytes(public[Attribute.PUBLIC_EXPONENT]), "big")
    except (p11.PKCS11Error, TypeError):
        return None
    key = rsa.RSAPublicNumbers(e, n).public_key()
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return AgentKey(der, n, e, key.key_size)


def _rsa_public_keys(session: Any) -> Iterator[Any]:
    yield from session.get_objects(
        {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA}
    )


def find_agent_key(session: Any, fingerprint: str, *, trusted: bool) -> Any | None:
    """The token's public key object for the agent ``fingerprint`` (a trusted one only, if
    ``trusted``), or None."""
    for public in _rsa_public_keys(session):
        agent = _agent_of(public)
        if agent is None or agent.fingerprint != fingerprint:
            continue
        if not trusted:
            return public
        try:
            if bool(public[Attribute.TRUSTED]) and bool(public[Attribute.WRAP]):
                return public
        except p11.PKCS11Error:
            continue
    return None


def agent_admitted(session: Any, fingerprint: str) -> bool:
    return find_agent_key(session, fingerprint, trusted=True) is not None


def admit(session: Any, agent: AgentKey) -> bool:
    """Import ``agent`` as a trusted wrapping key (an SO session); False if already there."""
    if find_agent_key(session, agent.fingerprint, trusted=True) is not None:
        return False
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.PUBLIC_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: False,  # the SO may create only public objects
            Attribute.LABEL: agent.label,
            Attribute.ID: agent.digest,
            Attribute.MODULUS: _int_bytes(agent.modulus),
            Attribute.PUBLIC_EXPONENT: _int_bytes(agent.exponent),
            Attribute.WRAP: True,
            Attribute.TRUSTED: True,
            Attribute.ENCRYPT: False,
            Attribute.VERIFY: False,
        }
    )
    return True


def wrap_for_agent(session: Any, kek: Any, ref: KeyVersionRef, fingerprint: str) -> bytes:
    """``C_WrapKey`` of ``kek`` under the agent's public key. The token decides: it refuses a
    wrapping key the SO did not admit and a KEK not created extractable (for escrow)."""
    public = find_agent_key(session, fingerprint, trusted=False)
    if public is None:
        raise HsmError(
            Reason.ESCROW_AGENT_NOT_ADMITTED,
            f"the token holds no key of escrow agent {fingerprint}: the Security Officer "
            "has not admitted it (kustody escrow admit)",
        )
    try:
        wrapped: bytes = public.wrap_key(
            kek, mechanism=Mechanism.RSA_PKCS_OAEP, mechanism_param=OAEP_PARAMS
        )
    except p11.KeyNotWrappable:
        raise HsmError(
            Reason.ESCROW_AGENT_NOT_ADMITTED,
            f"the token refused to wrap KEK version {ref} under escrow agent {fingerprint} "
            "(CKR_KEY_NOT_WRAPPABLE): the agent's key is not trusted (CKA_TRUSTED is set "
            "only by the Security Officer: kustody escrow admit)",
        ) from None
    except p11.KeyUnextractable:
        raise HsmError(
            Reason.VERSION_NOT_ESCROWABLE,
            f"the token refused to wrap KEK version {ref} (CKR_KEY_UNEXTRACTABLE): the "
            "version was created never-extractable; only versions created for an escrowed "
            "KeyRing can be escrowed (rotate to make one)",
        ) from None
    except p11.PKCS11Error as exc:
        raise HsmError(
            Reason.INTERNAL, f"wrapping KEK version {ref} for escrow failed ({type(exc).__name__})"
        ) from None
    return bytes(wrapped)


def generate_agent_key(session: Any, label: str, bits: int = 3072) -> AgentKey:
    """An agent's key pair generated inside its own token (the private half sensitive, never
    extractable, able only to unwrap); returns the public half for the EscrowAgent."""
    agent_id = label.encode()
    public, _private = session.generate_keypair(
        KeyType.RSA,
        bits,
        id=agent_id,
        label=label,
        store=True,
        public_template={Attribute.WRAP: True, Attribute.ENCRYPT: False, Attribute.VERIFY: False},
        private_template={
            Attribute.UNWRAP: True,
            Attribute.DECRYPT: False,
            Attribute.SIGN: False,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
        },
    )
    agent = _agent_of(public)
    assert agent is not None
    return agent


def public_key_pem(agent: AgentKey) -> str:
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_der_public_key(agent.der)
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")


def _private_key_for(session: Any, fingerprint: str) -> Any:
    public = find_agent_key(session, fingerprint, trusted=False)
    if public is None:
        raise HsmError(
            Reason.ESCROW_AGENT_NOT_ADMITTED,
            f"the target token holds no key pair of escrow agent {fingerprint}",
        )
    found = list(
        session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: bytes(public[Attribute.ID])}
        )
    )
    if not found:
        raise HsmError(
            Reason.ESCROW_AGENT_NOT_ADMITTED,
            f"the target token holds the public key of escrow agent {fingerprint} but not its "
            "private key",
        )
    return found[0]


@dataclass(frozen=True)
class Recovered:
    ref: KeyVersionRef
    check_value: str
    created: bool  # False: the token already held this version with this check value


def _check_value(key: Any) -> str:
    try:
        value = bytes(key[Attribute.CHECK_VALUE])
    except p11.PKCS11Error:
        value = b""
    if value:
        return value.hex()
    try:
        return bytes(key.encrypt(bytes(16), mechanism=Mechanism.AES_ECB)[:3]).hex()
    except (p11.PKCS11Error, AttributeError, NotImplementedError):
        return ""


def recover(session: Any, package: Package) -> Recovered:
    """Unwrap ``package`` inside the token holding the agent's private key into the KEK
    version it came from: same label, same ID, same check value (checked; a mismatch removes
    the object again), extractable only under trusted keys."""
    ref = parse_label(package.label)
    if ref is None or (ref.key_ring, ref.version) != (package.key_ring, package.version):
        raise HsmError(Reason.INVALID_ARGUMENT, "the package's label does not name its version")
    if ref.object_id != package.object_id:
        raise HsmError(Reason.INVALID_ARGUMENT, "the package's object id does not match its label")
    if package.mechanism != MECHANISM:
        raise HsmError(Reason.INVALID_ARGUMENT, f"unknown mechanism {package.mechanism}")
    existing = list(
        session.get_objects({Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: ref.object_id})
    )
    if existing:
        if _check_value(existing[0]) == package.check_value:
            return Recovered(ref, package.check_value, created=False)
        raise HsmError(
            Reason.KEY_NOT_TRUSTED,
            f"the target token already holds another key as KEK version {ref}; not overwritten",
        )
    private = _private_key_for(session, package.agent_fingerprint)
    try:
        kek = private.unwrap_key(
            ObjectClass.SECRET_KEY,
            KeyType.AES,
            package.wrapped,
            id=ref.object_id,
            label=ref.label,
            store=True,
            mechanism=Mechanism.RSA_PKCS_OAEP,
            mechanism_param=OAEP_PARAMS,
            capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT,
            template=KEK_TEMPLATE_ESCROW,
        )
    except p11.PKCS11Error as exc:
        raise HsmError(
            Reason.INVALID_ARGUMENT,
            f"the token could not unwrap the package of {ref} ({type(exc).__name__}): not made "
            "for this agent's key, or damaged",
        ) from None
    value = _check_value(kek)
    if value != package.check_value:
        kek.destroy()
        raise HsmError(
            Reason.KEY_NOT_TRUSTED,
            f"the key unwrapped from the package of {ref} has check value {value}, the package "
            f"says {package.check_value}; removed again",
        )
    for application, data in (
        (ESCROW_APPLICATION, b"escrow"),
        (RECOVERED_APPLICATION, f"{package.agent_fingerprint} {package.fingerprint}".encode()),
    ):
        session.create_object(
            {
                Attribute.CLASS: ObjectClass.DATA,
                Attribute.TOKEN: True,
                Attribute.PRIVATE: True,
                Attribute.LABEL: ref.label,
                Attribute.APPLICATION: application,
                Attribute.VALUE: data,
            }
        )
    return Recovered(ref, value, created=True)
