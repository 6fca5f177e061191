"""The DataKey backup document (domain.backup) and keyset adoption (domain.keyset): only
wrapped keys, key ids carried over, strict parsing."""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from kustody.domain import backup, keyset
from kustody.domain.keyset import GenerationState, KeysetDocumentError

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def _datakey(uid: str = "uid-1", generations: int = 2) -> dict:  # type: ignore[type-arg]
    gens: list[keyset.Generation] = []
    for i in range(generations):
        gens = keyset.add_generation(
            gens, uid=uid, wrapped=f"kustody:v1:ring:1:g{i}", version=1, now=T0
        )
    return {
        "metadata": {"namespace": "shop", "name": "db", "uid": uid},
        "spec": {"keyRingRef": {"name": "ring"}, "secretName": "db-dek", "exposePlaintext": True},
        "status": {"generations": keyset.to_status(gens), "wrappedKey": gens[-1].wrapped},
    }


def test_backup_round_trip_keeps_key_ids_and_holds_no_plaintext() -> None:
    dk = _datakey()
    doc, skipped = backup.build(
        [dk, {"metadata": {"namespace": "a", "name": "new", "uid": "u"}, "spec": {}}], [], T0
    )
    assert skipped == ["a/new: no key material yet"]
    text = json.dumps(doc)
    (entry,) = backup.parse(text)
    assert entry.key_ids == {g["keyId"] for g in dk["status"]["generations"]}
    secret = backup.secret_for(entry, "2026-01-01T00:00:00Z")
    assert "ownerReferences" not in secret["metadata"]
    assert secret["metadata"]["annotations"][backup.ANNOTATION_RESTORED]
    assert "plaintext-key" not in secret["data"]  # exposePlaintext: still never restored
    published = keyset.parse_keyset_document(base64.b64decode(secret["data"]["keyset"]), T0)
    assert [(g.generation, g.key_id, g.state) for g in published] == [
        (1, keyset.key_id_for("uid-1", 1), GenerationState.DECRYPT_ONLY),
        (2, keyset.key_id_for("uid-1", 2), GenerationState.PRIMARY),
    ]


@pytest.mark.parametrize(
    "document",
    [
        "not json",
        "{}",
        '{"format":"kustody.io/backup/v1"}',
        '{"format":"kustody.io/backup/v1","dataKeys":[{"namespace":"a"}]}',
    ],
)
def test_a_damaged_backup_restores_nothing(document: str) -> None:
    with pytest.raises(backup.BackupError):
        backup.parse(document)


def test_keyset_documents_are_parsed_strictly() -> None:
    good = keyset.wrapped_keyset_document(keyset.from_status(_datakey()["status"], "uid-1"))
    assert len(keyset.parse_keyset_document(good, T0)) == 2
    doc = json.loads(good)
    for broken in (
        {**doc, "format": "other"},
        {**doc, "keys": []},
        {**doc, "primaryKeyId": 7},
        {**doc, "keys": [doc["keys"][0], doc["keys"][0]]},
        {**doc, "keys": [{**doc["keys"][0], "keyId": "1"}, doc["keys"][1]]},
        {**doc, "keys": [{**doc["keys"][0], "status": "Primary"}, doc["keys"][1]]},
    ):
        with pytest.raises(KeysetDocumentError):
            keyset.parse_keyset_document(json.dumps(broken), T0)


def test_a_new_generation_never_repeats_an_adopted_key_id() -> None:
    adopted = keyset.from_status(_datakey(uid="old")["status"], "old")
    clash = keyset.key_id_for("new", 3)
    adopted = [*adopted[:1], keyset.Generation(2, clash, "w", 1, GenerationState.PRIMARY, T0)]
    after = keyset.add_generation(adopted, uid="new", wrapped="w3", version=1, now=T0)
    ids = [g.key_id for g in after]
    assert len(set(ids)) == 3
    assert ids[-1] != clash


# --- escrow (domain.escrow): agent keys, refusals, packages --------------------------------


def _pem(bits: int) -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def test_agent_keys_must_be_rsa_public_keys_of_at_least_3072_bits() -> None:
    from kustody.domain.escrow import EscrowError, parse_public_key

    agent = parse_public_key(_pem(3072))
    assert agent.bits == 3072
    assert agent.fingerprint.startswith("sha256:")
    assert len(agent.fingerprint) == 71
    with pytest.raises(EscrowError, match="2048 bits"):
        parse_public_key(_pem(2048))
    with pytest.raises(EscrowError, match="private key"):
        parse_public_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n")
    with pytest.raises(EscrowError, match="not a PEM"):
        parse_public_key("hello")


def test_agents_outside_the_jurisdictions_or_not_admitted_are_refused_by_name() -> None:
    from kustody.domain.escrow import refusals

    agents = {
        "ok": {"spec": {"jurisdiction": "DE"}, "status": {"admitted": True}},
        "far": {"spec": {"jurisdiction": "US"}, "status": {"admitted": True}},
        "new": {"spec": {"jurisdiction": "CH"}, "status": {"admitted": False}},
        "gone": None,
    }
    refused = {r.agent: r.describe() for r in refusals(list(agents), ["CH", "DE"], agents)}
    assert set(refused) == {"far", "new", "gone"}
    assert "(jurisdiction US)" in refused["far"]
    assert "not in spec.escrow.allowedJurisdictions (CH, DE)" in refused["far"]
    assert "not admitted" in refused["new"]
    assert "does not exist" in refused["gone"]


def test_escrow_packages_round_trip_and_are_parsed_strictly() -> None:
    from kustody.domain.escrow import MECHANISM, EscrowError, Package

    package = Package(
        "sha256:" + "ab" * 32, "vault", 2, "kustody:vault:v2", b"\x01" * 32, "a1b2c3",
        MECHANISM, "2026-12-02T00:00:00Z", b"\x00" * 384,
    )  # fmt: skip
    again = Package.from_json(package.to_json())
    assert again == package
    assert again.fingerprint == package.fingerprint
    doc = json.loads(package.to_json())
    for broken in ({**doc, "format": "x"}, {**doc, "mechanism": "CKM_RSA_PKCS"}, {"format": 1}):
        with pytest.raises(EscrowError):
            Package.from_json(json.dumps(broken))
