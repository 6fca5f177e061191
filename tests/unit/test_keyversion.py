"""KEK version naming and the primary version rule."""

from __future__ import annotations

import hashlib

import pytest
from kustody.domain.errors import InvalidArgument
from kustody.domain.keyversion import KeyVersionRef, VersionState, parse_label, primary_version


def test_label_and_id_are_deterministic() -> None:
    ref = KeyVersionRef("payments.prod", 7)
    assert ref.label == "kustody:payments.prod:v7"
    assert ref.object_id == hashlib.sha256(b"kustody:payments.prod:v7").digest()
    assert KeyVersionRef("payments.prod", 7).object_id == ref.object_id
    assert ref.kms_key_id("0b7fb6") == "payments.prod:v7:0b7fb6"


@pytest.mark.parametrize("label", ["kustody:a:v1", "kustody:a-b.c:v4294967295"])
def test_parse_label_round_trips(label: str) -> None:
    ref = parse_label(label)
    assert ref is not None
    assert ref.label == label


@pytest.mark.parametrize(
    "label", ["other", "kustody:a:v0", "kustody:a:v01", "kustody:A:v1", "kustody:a:v4294967296"]
)
def test_parse_label_ignores_foreign_labels(label: str) -> None:
    assert parse_label(label) is None


@pytest.mark.parametrize(
    ("ring", "version"), [("", 1), ("Upper", 1), ("a:b", 1), ("-a", 1), ("a", 0), ("a", 2**32)]
)
def test_invalid_refs_are_rejected(ring: str, version: int) -> None:
    with pytest.raises(InvalidArgument):
        KeyVersionRef(ring, version)


def test_primary_is_highest_enabled() -> None:
    E, D, X = VersionState.ENABLED, VersionState.DISABLED, VersionState.DESTROYED
    assert primary_version({1: E, 2: E, 3: D, 4: X}) == 2
    assert primary_version({1: D}) is None
    assert primary_version({}) is None
