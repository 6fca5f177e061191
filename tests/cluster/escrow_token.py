"""Direct PKCS#11 on a test token, as someone holding the user PIN (not through Kustody).

Run as a child process with the token's environment (SoftHSM2 reads SOFTHSM2_CONF once):

    python escrow_token.py MODULE LABEL PIN_FILE plant-untrusted PEM
        import an RSA public key as an ordinary (untrusted) wrapping key
    python escrow_token.py MODULE LABEL PIN_FILE plant-recovered RING VERSION
        plant an AES key of known value under a future KEK version's label, with the
        attributes and records of a key recovered from an escrow package
    python escrow_token.py MODULE LABEL PIN_FILE try-export RING VERSION
        try every way to get KEK version RING/vVERSION out: C_WrapKey under every RSA public
        key in the token and under a fresh AES wrapping key, set CKA_EXTRACTABLE, read
        CKA_VALUE; print {"attempt": "outcome"} as JSON (outcome "ok" means it got out)
    python escrow_token.py MODULE LABEL PIN_FILE attributes LABEL_OR_ID
        print the security attributes of secret and private key objects labelled so
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import pkcs11
import pkcs11.exceptions as p11
from cryptography.hazmat.primitives import serialization
from pkcs11 import MGF, Attribute, KeyType, Mechanism, MechanismFlag, ObjectClass


def _session(module: str, label: str, pin_file: str) -> Any:
    token = pkcs11.lib(module).get_token(token_label=label)
    return token.open(user_pin=open(pin_file).read().strip(), rw=True)


def _outcome(call: Any) -> str:
    try:
        call()
    except p11.PKCS11Error as exc:
        return type(exc).__name__
    return "ok"


def main(argv: list[str]) -> int:
    module, label, pin_file, action, *rest = argv
    with _session(module, label, pin_file) as s:
        if action == "plant-untrusted":
            with open(rest[0], "rb") as fh:
                key = serialization.load_pem_public_key(fh.read())
            numbers = key.public_numbers()  # type: ignore[union-attr]
            n, e = numbers.n, numbers.e
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.PUBLIC_KEY,
                    Attribute.KEY_TYPE: KeyType.RSA,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: False,
                    Attribute.LABEL: "planted-by-user",
                    Attribute.ID: b"planted",
                    Attribute.MODULUS: n.to_bytes((n.bit_length() + 7) // 8, "big"),
                    Attribute.PUBLIC_EXPONENT: e.to_bytes((e.bit_length() + 7) // 8, "big"),
                    Attribute.WRAP: True,
                }
            )
            print("{}")
        elif action == "plant-recovered":
            ring, version = rest
            kek_label = f"kustody:{ring}:v{version}"
            s.create_object(
                {
                    Attribute.CLASS: ObjectClass.SECRET_KEY,
                    Attribute.KEY_TYPE: KeyType.AES,
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.LABEL: kek_label,
                    Attribute.ID: hashlib.sha256(kek_label.encode()).digest(),
                    Attribute.VALUE: bytes(range(32)),  # known to the planter
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: True,
                    Attribute.WRAP_WITH_TRUSTED: True,
                    Attribute.ENCRYPT: True,
                    Attribute.DECRYPT: True,
                    Attribute.WRAP: False,
                    Attribute.UNWRAP: False,
                }
            )
            for application in ("kustody-escrow", "kustody-recovered"):
                s.create_object(
                    {
                        Attribute.CLASS: ObjectClass.DATA,
                        Attribute.TOKEN: True,
                        Attribute.PRIVATE: True,
                        Attribute.LABEL: kek_label,
                        Attribute.APPLICATION: application,
                        Attribute.VALUE: b"forged",
                    }
                )
            print("{}")
        elif action == "try-export":
            ring, version = rest
            kek_label = f"kustody:{ring}:v{version}"
            kek = s.get_key(
                object_class=ObjectClass.SECRET_KEY,
                id=hashlib.sha256(kek_label.encode()).digest(),
            )
            out: dict[str, str] = {}
            publics = s.get_objects(
                {Attribute.CLASS: ObjectClass.PUBLIC_KEY, Attribute.KEY_TYPE: KeyType.RSA}
            )
            for i, public in enumerate(publics):
                trusted = bool(public[Attribute.TRUSTED])
                for name, mech, param in (
                    ("rsa-oaep", Mechanism.RSA_PKCS_OAEP, (Mechanism.SHA_1, MGF.SHA1, None)),
                    ("rsa-pkcs", Mechanism.RSA_PKCS, None),
                ):
                    out[f"C_WrapKey {name} under RSA key {i} (trusted={trusted})"] = _outcome(
                        lambda p=public, m=mech, q=param: p.wrap_key(
                            kek, mechanism=m, mechanism_param=q
                        )
                    )
            wrapping = s.generate_key(
                KeyType.AES,
                256,
                store=False,
                capabilities=MechanismFlag.WRAP | MechanismFlag.UNWRAP,
                template={Attribute.WRAP: True, Attribute.EXTRACTABLE: False},
            )
            for name, mech in (
                ("aes-key-wrap", Mechanism.AES_KEY_WRAP),
                ("aes-key-wrap-pad", Mechanism.AES_KEY_WRAP_PAD),
            ):
                out[f"C_WrapKey {name} under a new AES key"] = _outcome(
                    lambda m=mech: wrapping.wrap_key(kek, mechanism=m)
                )
            out["C_GetAttributeValue CKA_VALUE"] = _outcome(lambda: kek[Attribute.VALUE])
            out["C_SetAttributeValue CKA_EXTRACTABLE=true"] = _outcome(
                lambda: kek.__setitem__(Attribute.EXTRACTABLE, True)
            )
            out["C_SetAttributeValue CKA_WRAP_WITH_TRUSTED=false"] = _outcome(
                lambda: kek.__setitem__(Attribute.WRAP_WITH_TRUSTED, False)
            )
            out["C_SetAttributeValue CKA_SENSITIVE=false"] = _outcome(
                lambda: kek.__setitem__(Attribute.SENSITIVE, False)
            )
            print(json.dumps(out))
        elif action == "attributes":
            wanted = rest[0]
            found: dict[str, Any] = {}
            for kind, cls in (
                ("secret", ObjectClass.SECRET_KEY),
                ("private", ObjectClass.PRIVATE_KEY),
            ):
                for obj in s.get_objects({Attribute.CLASS: cls, Attribute.LABEL: wanted}):
                    found[kind] = {
                        "sensitive": bool(obj[Attribute.SENSITIVE]),
                        "extractable": bool(obj[Attribute.EXTRACTABLE]),
                        "wrapWithTrusted": bool(obj[Attribute.WRAP_WITH_TRUSTED]),
                        "value": _outcome(lambda o=obj: o[Attribute.VALUE]),
                    }
            print(json.dumps(found))
        else:
            print(f"unknown action {action}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
