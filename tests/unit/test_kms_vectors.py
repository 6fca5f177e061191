"""tests/vectors/kms_envelope_v1.json: the KMS v2 envelope as the Python plugin writes it, which
kustody-kms (kms/envelope_test.go) is checked against. Here: the file is what the generator
writes, and the Python implementation reads its own vectors back."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from kustody.domain.aad import KmsBinding, associated_data
from kustody.domain.envelope import Envelope
from kustody.domain.errors import DomainError
from kustody.domain.keyversion import KeyVersionRef, parse_label

ROOT = Path(__file__).resolve().parents[2]
VECTORS = json.loads((ROOT / "tests/vectors/kms_envelope_v1.json").read_text())


def test_the_vectors_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location(
        "gen_kms_vectors", ROOT / "tools/gen_kms_vectors.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    assert module.main(["--check"]) == 0, "run tools/gen_kms_vectors.py"


@pytest.mark.parametrize("v", VECTORS["seal"], ids=lambda v: f"{v['ring'][:20]}-v{v['version']}")
def test_seal_vectors_open_with_the_python_implementation(v: dict[str, object]) -> None:
    envelope = Envelope.from_bytes(bytes.fromhex(str(v["envelope"])))
    ref = KeyVersionRef(str(v["ring"]), int(str(v["version"])))
    assert envelope.key == ref
    assert ref.kms_key_id(str(v["fingerprint"])) == v["key_id"]
    aad = associated_data(envelope.header, KmsBinding(str(v["key_id"])))
    assert aad.hex() == v["aad"]
    plaintext = AESGCM(bytes.fromhex(str(v["key"]))).decrypt(
        envelope.nonce, envelope.ciphertext, aad
    )
    assert plaintext.hex() == v["plaintext"]


@pytest.mark.parametrize("v", VECTORS["malformed"], ids=lambda v: str(v["name"]))
def test_malformed_vectors_are_refused_with_their_message(v: dict[str, str]) -> None:
    with pytest.raises(DomainError) as caught:
        Envelope.from_bytes(bytes.fromhex(v["raw"]))
    assert str(caught.value) == v["error"]


def test_label_vectors() -> None:
    for v in VECTORS["labels"]:
        ref = parse_label(v["label"])
        assert (ref.key_ring if ref else None, ref.version if ref else None) == (
            v["ring"],
            v["version"],
        ), v["label"]


def test_the_vectors_cover_what_the_go_plugin_must_get_right() -> None:
    names = {v["name"] for v in VECTORS["malformed"]}
    assert {"too long", "bad magic", "format version 2", "truncated", "version 0"} <= names
    assert "ciphertext too long" in names
    rings = [v["ring"] for v in VECTORS["seal"]]
    assert max(len(r) for r in rings) == 253  # the longest KeyRing name
    assert any(int(v["version"]) == 2**32 - 1 for v in VECTORS["seal"])
    assert any(v["ring"] is None for v in VECTORS["labels"])
    assert len(VECTORS["key_id_errors"]) == 2
    validity = {v["valid"] for v in VECTORS["key_rings"]}
    assert validity == {True, False}
