"""The sidecar's allow-list of remote clients, its audit line, and the PKCS#11 paths that
must stay gone (issue 9)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from kustody.api.errors import HsmError, Reason
from kustody.domain.keyversion import (
    DEFAULT_MIN_DESTROY_DELAY_SECONDS,
    SETTABLE_STATES,
    VersionState,
)
from kustody.pkcs11.kekstore import KekStore
from kustody.sidecar import audit, keyservice, servicer
from kustody.sidecar.access import RPCS, CertificateAccess, ClientRoles, Role, parse_identity


def test_roles_file_maps_san_identities_to_roles(tmp_path: Path) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text(
        '"URI:spiffe://corp/op": operator\ndns:KMS.corp.example.: kms\n'
        '"DNS:mon.corp.example": read-only\n'
    )
    roles = ClientRoles.load(path)
    assert roles.entries == {
        "URI:spiffe://corp/op": Role.OPERATOR,
        "DNS:kms.corp.example": Role.KMS,
        "DNS:mon.corp.example": Role.READ_ONLY,
    }
    assert roles.match(["DNS:other", "URI:spiffe://corp/op"]) == (
        "URI:spiffe://corp/op",
        Role.OPERATOR,
    )
    assert roles.match(["URI:spiffe://corp/OP"]) is None  # URIs are compared exactly
    # Two listed identities with different roles on one certificate: refused, not the union.
    assert roles.match(["URI:spiffe://corp/op", "DNS:kms.corp.example"]) is None


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("[a, b]", "expected a mapping"),
        ('"URI:spiffe://x": admin', "role 'admin' is not one of operator, kms, read-only"),
        ('"CN=operator": operator', "is not 'URI:<uri>' or 'DNS:<name>'"),
        ('"URI:": operator', "is not 'URI:<uri>' or 'DNS:<name>'"),
        ("a: [", "cannot read the client roles file"),
    ],
)
def test_a_bad_roles_file_is_a_clear_error(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=error.replace("[", r"\[").replace("(", r"\(")):
        ClientRoles.load(path)


def test_an_empty_roles_file_denies_everyone(tmp_path: Path) -> None:
    path = tmp_path / "roles.yaml"
    path.write_text("")
    access = CertificateAccess(ClientRoles.load(path))
    context = SimpleNamespace(auth_context=lambda: {})
    caller = access.identify(context)
    assert caller.role is None
    assert not caller.local
    with pytest.raises(HsmError) as info:
        access.check(caller, "Health")
    assert info.value.reason is Reason.PERMISSION_DENIED


def test_roles_nest_and_lifecycle_is_operator_only() -> None:
    assert RPCS[Role.READ_ONLY] < RPCS[Role.KMS] < RPCS[Role.OPERATOR]
    lifecycle = {"CreateKeyVersion", "SetVersionState", "DestroyVersion"}
    assert not lifecycle & RPCS[Role.KMS]
    assert lifecycle <= RPCS[Role.OPERATOR]
    assert parse_identity("dns:Host.Example.") == "DNS:host.example"


def test_audit_line_is_json_with_capped_fields() -> None:
    text = audit.line(
        rpc="Decrypt",
        peer="URI:" + "x" * 400,
        role="operator",
        key_ring="pay",
        version=3,
        items=0,
        outcome="PLAINTEXT_EXPORT_FORBIDDEN",
    )
    record = json.loads(text)
    assert record["rpc"] == "Decrypt"
    assert len(record["peer"]) == 253
    assert (record["key_ring"], record["version"], record["outcome"]) == (
        "pay",
        3,
        "PLAINTEXT_EXPORT_FORBIDDEN",
    )


def test_destroy_scheduled_state_and_default_waiting_period() -> None:
    assert VersionState("DESTROY_SCHEDULED") is VersionState.DESTROY_SCHEDULED
    assert VersionState.DESTROY_SCHEDULED in SETTABLE_STATES
    assert VersionState.DESTROYED not in SETTABLE_STATES
    assert DEFAULT_MIN_DESTROY_DELAY_SECONDS == 24 * 3600


def test_dead_pkcs11_paths_are_gone() -> None:
    """Issue 9 item 12: no code path exposes PKCS#11 operations nobody calls."""
    assert not hasattr(KekStore, "generate")
    assert not hasattr(KekStore, "unseal")
    assert not hasattr(keyservice.KeyService, "seal")
    assert not hasattr(keyservice, "BindingFor")
    assert not hasattr(servicer, "error_pb")
