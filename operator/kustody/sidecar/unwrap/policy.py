"""Who may unwrap what: pure rules, no I/O.

1. The binding's namespace (it is in the envelope's AAD) is the token's namespace.
2. The DataKey exists in that namespace and seals under the envelope's KeyRing.
3. The ServiceAccount is in the DataKey's ``spec.consumers``; none listed means nobody.
4. The KeyRing exists and (still) allows the namespace in ``spec.allowedNamespaces``.
"""

from __future__ import annotations

from kustody.client.errors import Reason
from kustody.sidecar.unwrap.datakeys import DataKeyGrant
from kustody.sidecar.unwrap.refusal import Refusal
from kustody.sidecar.unwrap.tokens import Identity


def check_namespace(identity: Identity, namespace: str) -> None:
    if namespace != identity.namespace:
        raise Refusal(
            Reason.NAMESPACE_MISMATCH,
            f"ServiceAccount {identity.key} may not unwrap keys of namespace {namespace!r}",
        )


def check_grant(
    identity: Identity, data_key: str, key_ring: str, grant: DataKeyGrant | None
) -> None:
    if grant is None:
        raise Refusal(
            Reason.DATAKEY_NOT_FOUND,
            f"DataKey {identity.namespace}/{data_key} does not exist",
        )
    if grant.key_ring != key_ring:
        raise Refusal(
            Reason.KEYRING_MISMATCH,
            f"DataKey {identity.namespace}/{data_key} does not use KeyRing {key_ring!r}",
        )
    if identity.service_account not in grant.consumers:
        raise Refusal(
            Reason.NOT_A_CONSUMER,
            f"ServiceAccount {identity.service_account!r} is not in spec.consumers of "
            f"DataKey {identity.namespace}/{data_key}",
        )


def check_keyring_allows(identity: Identity, key_ring: str, allowed: bool | None) -> None:
    """``allowed``: what the KeyRing's ``spec.allowedNamespaces`` says of the caller's
    namespace now (None: the KeyRing does not exist)."""
    if allowed is None:
        raise Refusal(Reason.KEYRING_NOT_FOUND, f"KeyRing {key_ring!r} does not exist")
    if not allowed:
        raise Refusal(
            Reason.NAMESPACE_NOT_ALLOWED,
            f"KeyRing {key_ring!r} does not allow namespace {identity.namespace!r} "
            "(spec.allowedNamespaces)",
        )
