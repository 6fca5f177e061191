"""Another user of a shared HSM partition, as its own process (its own PKCS#11 library
instance, so SOFTHSM2_CONF is its own): plants key objects under a Kustody KEK version's label
and ID, or reads the public attributes of one.

    python cotenant.py MODULE TOKEN_LABEL PIN_FILE ACTION KEYRING VERSION

ACTION: known-value | imported-locked | wrapping-key | attributes (prints JSON).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pkcs11
from kustody.domain.keyversion import KeyVersionRef
from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

KNOWN = bytes(range(32))  # the planted key's value, known to the attacker


def _imported(session: Any, ref: KeyVersionRef, *, locked: bool) -> None:
    session.create_object(
        {
            Attribute.CLASS: ObjectClass.SECRET_KEY,
            Attribute.KEY_TYPE: KeyType.AES,
            Attribute.VALUE: KNOWN,
            Attribute.LABEL: ref.label,
            Attribute.ID: ref.object_id,
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: locked,
            Attribute.EXTRACTABLE: not locked,
            Attribute.ENCRYPT: True,
            Attribute.DECRYPT: True,
        }
    )


def _wrapping(session: Any, ref: KeyVersionRef) -> None:
    session.generate_key(
        KeyType.AES,
        256,
        id=ref.object_id,
        label=ref.label,
        store=True,
        capabilities=MechanismFlag.ENCRYPT | MechanismFlag.DECRYPT | MechanismFlag.WRAP,
        template={
            Attribute.TOKEN: True,
            Attribute.PRIVATE: True,
            Attribute.SENSITIVE: True,
            Attribute.EXTRACTABLE: False,
            Attribute.WRAP: True,
        },
    )


def _attributes(session: Any, ref: KeyVersionRef) -> dict[str, object]:
    (key,) = session.get_objects(
        {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.ID: ref.object_id}
    )
    names = {
        "local": Attribute.LOCAL,
        "never_extractable": Attribute.NEVER_EXTRACTABLE,
        "sensitive": Attribute.SENSITIVE,
        "extractable": Attribute.EXTRACTABLE,
        "wrap": Attribute.WRAP,
        "unwrap": Attribute.UNWRAP,
        "value_len": Attribute.VALUE_LEN,
    }
    return {name: key[attribute] for name, attribute in names.items()}


def main(argv: list[str]) -> int:
    module, label, pin_file, action, ring, version = argv
    ref = KeyVersionRef(ring, int(version))
    token = pkcs11.lib(module).get_token(token_label=label)
    with token.open(user_pin=Path(pin_file).read_text(), rw=True) as session:
        if action == "known-value":
            _imported(session, ref, locked=False)
        elif action == "imported-locked":
            _imported(session, ref, locked=True)
        elif action == "wrapping-key":
            _wrapping(session, ref)
        elif action == "attributes":
            print(json.dumps(_attributes(session, ref)))
        else:
            raise SystemExit(f"unknown action {action}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
