"""The attributes of the keys Kustody generates in a token: one definition, used for KEK
versions, escrowable versions and the probe's scratch key alike."""

from __future__ import annotations

from typing import Any

from pkcs11 import Attribute

# A KEK version: a private token object, sensitive and never extractable, that encrypts and
# decrypts (AES-GCM) and can do nothing else (no wrap, unwrap, sign, verify or derive).
KEK_TEMPLATE: dict[Any, Any] = {
    Attribute.TOKEN: True,
    Attribute.PRIVATE: True,
    Attribute.SENSITIVE: True,
    Attribute.EXTRACTABLE: False,
    Attribute.ENCRYPT: True,
    Attribute.DECRYPT: True,
    Attribute.SIGN: False,
    Attribute.VERIFY: False,
    Attribute.WRAP: False,
    Attribute.UNWRAP: False,
    Attribute.DERIVE: False,
}
