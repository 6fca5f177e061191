"""Typed views of the three specs: defaults from the CRD descriptions, label selectors."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.errors import InvalidSpec
from kustody.domain.specs import (
    DataKeySpec,
    DeletionPolicy,
    KeyRingSpec,
    LabelRequirement,
    MaintenanceWindow,
    NamespaceSelector,
    RestartTarget,
    Rewrap,
    RotationPolicySpec,
    SecretKeys,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _docs(name: str, kind: str) -> dict[str, dict[str, Any]]:
    with (EXAMPLES / name).open() as f:
        docs = [d for d in yaml.safe_load_all(f) if d and d.get("kind") == kind]
    assert docs, f"no {kind} in examples/{name}"
    return {d["metadata"]["name"]: d for d in docs}


# -- RotationPolicy -------------------------------------------------------------------------


def test_example_rotation_policy() -> None:
    raw = _docs("rotationpolicy.yaml", "RotationPolicy")["quarterly"]
    policy = RotationPolicySpec.parse(raw["spec"])
    assert policy.rotation_period == dt.timedelta(days=90)
    assert policy.retire_after == dt.timedelta(days=30)
    assert policy.destroy_after == dt.timedelta(days=30)
    assert policy.rewrap is Rewrap.AUTOMATIC
    assert policy.window == MaintenanceWindow(
        days=frozenset({1, 2, 3}),  # Tue, Wed, Thu with Monday = 0
        start=dt.time(2, 0),
        length=dt.timedelta(hours=3),
    )


def test_rotation_policy_defaults() -> None:
    policy = RotationPolicySpec.parse({"rotationPeriod": "24h"})
    assert policy.rotation_period == dt.timedelta(days=1)
    assert policy.retire_after is None  # omitted: never disabled automatically
    assert policy.destroy_after == dt.timedelta(hours=720)
    assert policy.rewrap is Rewrap.AUTOMATIC
    assert policy.window is None


def test_retire_after_zero_is_not_omitted() -> None:
    for zero in ("0", "0s"):
        policy = RotationPolicySpec.parse({"rotationPeriod": "1h", "retireAfter": zero})
        assert policy.retire_after == dt.timedelta(0)


def test_rotation_policy_explicit_values() -> None:
    policy = RotationPolicySpec.parse(
        {"rotationPeriod": "1h", "destroyAfter": "48h", "rewrap": "Manual", "retireAfter": "90m"}
    )
    assert policy.destroy_after == dt.timedelta(days=2)
    assert policy.rewrap is Rewrap.MANUAL
    assert policy.retire_after == dt.timedelta(minutes=90)


def test_rotation_policy_requires_a_period() -> None:
    with pytest.raises(InvalidSpec):
        RotationPolicySpec.parse({})
    with pytest.raises(InvalidSpec):
        RotationPolicySpec.parse({"rotationPeriod": "90d"})


@pytest.mark.parametrize(
    ("days", "expected"),
    [
        (["Mon"], {0}),
        (["Sun", "Sat"], {5, 6}),
        (["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], set(range(7))),
    ],
)
def test_window_days_are_weekday_numbers(days: list[str], expected: set[int]) -> None:
    window = MaintenanceWindow.parse({"days": days, "start": "23:45", "duration": "30m"})
    assert window.days == frozenset(expected)
    assert window.start == dt.time(23, 45)
    assert window.length == dt.timedelta(minutes=30)
    # dt.date.weekday() uses the same numbering.
    assert {dt.date(2024, 1, 1 + n).weekday() for n in expected} == expected  # 2024-01-01: Mon


# -- KeyRing --------------------------------------------------------------------------------


def test_example_keyring() -> None:
    raw = _docs("keyring.yaml", "KeyRing")["payments"]
    spec = KeyRingSpec.parse(raw["spec"])
    assert spec.provider == "default"  # omitted: the operator's default provider
    assert spec.policy_name == "quarterly"
    assert spec.allow_plaintext_export is False
    assert spec.deletion_policy is DeletionPolicy.RETAIN
    assert spec.allowed.allows("payments", None)  # by name, labels not needed
    assert spec.allowed.allows("shop", {"kustody.io/keyring": "payments"})
    assert not spec.allowed.allows("shop", {"kustody.io/keyring": "billing"})
    assert not spec.allowed.allows("shop", {})
    assert not spec.allowed.allows("shop", None)


def test_keyring_defaults() -> None:
    spec = KeyRingSpec.parse({"algorithm": "AES256GCM"})
    assert spec.provider == "default"
    assert spec.policy_name is None
    assert spec.allow_plaintext_export is False
    assert spec.deletion_policy is DeletionPolicy.RETAIN
    # allowedNamespaces omitted: no namespace is allowed, whatever its labels.
    assert not spec.allowed.needs_labels
    assert not spec.allowed.allows("default", {})
    assert not spec.allowed.allows("payments", {"kustody.io/keyring": "payments"})


def test_keyring_explicit_values() -> None:
    spec = KeyRingSpec.parse(
        {
            "algorithm": "AES256GCM",
            "provider": {"name": "onprem"},
            "allowPlaintextExport": True,
            "deletionPolicy": "Destroy",
        }
    )
    assert spec.provider == "onprem"
    assert spec.allow_plaintext_export is True
    assert spec.deletion_policy is DeletionPolicy.DESTROY


# -- allowedNamespaces (Kubernetes label-selector semantics) ---------------------------------


def _sel(selector: dict[str, Any] | None, names: list[str] | None = None) -> NamespaceSelector:
    raw: dict[str, Any] = {}
    if names is not None:
        raw["names"] = names
    if selector is not None:
        raw["selector"] = selector
    return NamespaceSelector.parse(raw)


def test_empty_selector_matches_every_namespace() -> None:
    sel = _sel({})
    assert sel.needs_labels
    assert sel.allows("anything", {})
    assert sel.allows("other", {"a": "b"})


def test_selector_needs_the_labels_to_decide() -> None:
    assert not _sel({}).allows("anything", None)


def test_names_only() -> None:
    sel = _sel(None, names=["a", "b"])
    assert not sel.needs_labels
    assert sel.allows("a", None)
    assert sel.allows("b", {"x": "y"})
    assert not sel.allows("c", {})


def test_names_or_selector() -> None:
    sel = _sel({"matchLabels": {"team": "pay"}}, names=["legacy"])
    assert sel.allows("legacy", {"team": "other"})
    assert sel.allows("new", {"team": "pay"})
    assert not sel.allows("new", {"team": "other"})


@pytest.mark.parametrize(
    ("expression", "labels", "expected"),
    [
        ({"key": "env", "operator": "In", "values": ["prod", "stage"]}, {"env": "prod"}, True),
        ({"key": "env", "operator": "In", "values": ["prod"]}, {"env": "dev"}, False),
        ({"key": "env", "operator": "In", "values": ["prod"]}, {}, False),
        ({"key": "env", "operator": "NotIn", "values": ["prod"]}, {"env": "dev"}, True),
        ({"key": "env", "operator": "NotIn", "values": ["prod"]}, {"env": "prod"}, False),
        # Kubernetes: NotIn also matches when the label is absent.
        ({"key": "env", "operator": "NotIn", "values": ["prod"]}, {}, True),
        ({"key": "env", "operator": "Exists"}, {"env": ""}, True),
        ({"key": "env", "operator": "Exists"}, {"other": "x"}, False),
        ({"key": "env", "operator": "DoesNotExist"}, {"other": "x"}, True),
        ({"key": "env", "operator": "DoesNotExist"}, {"env": "x"}, False),
        # An operator the schema does not know matches nothing (fail closed).
        ({"key": "env", "operator": "Gt", "values": ["1"]}, {"env": "2"}, False),
    ],
)
def test_match_expressions(
    expression: dict[str, Any], labels: dict[str, str], expected: bool
) -> None:
    assert _sel({"matchExpressions": [expression]}).allows("ns", labels) is expected


def test_requirements_are_anded() -> None:
    sel = _sel(
        {
            "matchLabels": {"team": "pay"},
            "matchExpressions": [
                {"key": "env", "operator": "In", "values": ["prod"]},
                {"key": "quarantine", "operator": "DoesNotExist"},
            ],
        }
    )
    assert sel.allows("ns", {"team": "pay", "env": "prod"})
    assert not sel.allows("ns", {"team": "pay", "env": "prod", "quarantine": "yes"})
    assert not sel.allows("ns", {"team": "pay", "env": "dev"})
    assert not sel.allows("ns", {"team": "ops", "env": "prod"})
    assert not sel.allows("ns", {"env": "prod"})


def test_match_labels_value_must_be_equal_not_just_present() -> None:
    sel = _sel({"matchLabels": {"team": "pay"}})
    assert not sel.allows("ns", {"team": ""})
    assert sel.allows("ns", {"team": "pay", "extra": "ok"})


_keys = st.sampled_from(["a", "b", "c"])
_values = st.sampled_from(["x", "y", "z"])


@given(
    st.dictionaries(_keys, _values),
    st.dictionaries(_keys, _values),
)
def test_match_labels_is_subset(match_labels: dict[str, str], labels: dict[str, str]) -> None:
    sel = _sel({"matchLabels": match_labels})
    assert sel.allows("ns", labels) == (match_labels.items() <= labels.items())


@given(_keys, st.frozensets(_values, min_size=1), st.dictionaries(_keys, _values))
def test_in_and_notin_are_complements(
    key: str, values: frozenset[str], labels: dict[str, str]
) -> None:
    inside = LabelRequirement(key, "In", values).matches(labels)
    outside = LabelRequirement(key, "NotIn", values).matches(labels)
    assert inside != outside
    exists = LabelRequirement(key, "Exists", frozenset()).matches(labels)
    absent = LabelRequirement(key, "DoesNotExist", frozenset()).matches(labels)
    assert exists != absent
    assert exists == (key in labels)
    if inside:
        assert exists


# -- DataKey --------------------------------------------------------------------------------


def test_example_minimal_datakey_defaults() -> None:
    raw = _docs("datakeys.yaml", "DataKey")["ledger"]
    spec = DataKeySpec.parse(raw["spec"])
    assert spec.key_ring == "payments"
    assert spec.secret_name == "ledger-dek"
    assert spec.length == 32
    assert spec.encryption_context == {}
    assert spec.labels == {}
    assert spec.annotations == {}
    assert spec.keys == SecretKeys()
    assert spec.keys.wrapped_key == "wrapped-key"
    assert spec.keys.key_ring == "key-ring"
    assert spec.keys.version == "key-version"
    assert spec.keys.context == "encryption-context"
    assert spec.keys.plaintext == "plaintext-key"
    assert spec.regenerate_after is None
    assert spec.restart_targets == ()
    assert spec.expose_plaintext is False
    assert spec.consumers == ("ledger",)


def test_example_full_datakey() -> None:
    raw = _docs("datakeys.yaml", "DataKey")["card-vault"]
    spec = DataKeySpec.parse(raw["spec"])
    assert spec.key_ring == "payments"
    assert spec.secret_name == "card-vault-dek"
    assert spec.length == 32
    assert spec.encryption_context == {"app": "card-vault", "purpose": "pan-tokenisation"}
    assert spec.regenerate_after == dt.timedelta(days=365)
    assert spec.labels == {
        "app.kubernetes.io/name": "card-vault",
        "app.kubernetes.io/part-of": "payments",
    }
    assert spec.annotations == {"example.com/owner": "payments-platform"}
    # Four names given; the one omitted keeps its default.
    assert spec.keys == SecretKeys(
        wrapped_key="dek.wrapped",
        key_ring="dek.keyring",
        version="dek.version",
        context="dek.context",
        plaintext="plaintext-key",
    )
    assert spec.restart_targets == (
        RestartTarget("Deployment", "card-vault-api"),
        RestartTarget("StatefulSet", "card-vault-worker"),
    )
    assert spec.expose_plaintext is False
    assert spec.consumers == ("card-vault-api", "card-vault-worker")


def test_datakey_length_and_plaintext() -> None:
    spec = DataKeySpec.parse(
        {"keyRingRef": {"name": "r"}, "secretName": "s", "length": 16, "exposePlaintext": True}
    )
    assert spec.length == 16
    assert spec.expose_plaintext is True


def test_datakey_requires_key_ring_and_secret_name() -> None:
    with pytest.raises(InvalidSpec):
        DataKeySpec.parse({"secretName": "s"})
    with pytest.raises(InvalidSpec):
        DataKeySpec.parse({"keyRingRef": {"name": "r"}})


def test_parsed_mappings_are_copies() -> None:
    raw: dict[str, Any] = {
        "keyRingRef": {"name": "r"},
        "secretName": "s",
        "encryptionContext": {"a": "1"},
        "template": {"metadata": {"labels": {"l": "1"}}},
    }
    spec = DataKeySpec.parse(raw)
    raw["encryptionContext"]["a"] = "changed"
    raw["template"]["metadata"]["labels"]["l"] = "changed"
    assert spec.encryption_context == {"a": "1"}
    assert spec.labels == {"l": "1"}


@pytest.mark.parametrize(
    ("parse", "raw", "message"),
    [
        (DataKeySpec.parse, None, "spec is required"),
        (DataKeySpec.parse, {"secretName": "s"}, "spec.keyRingRef.name is required"),
        (DataKeySpec.parse, {"keyRingRef": {"name": "r"}}, "spec.secretName is required"),
        (
            DataKeySpec.parse,
            {"keyRingRef": {"name": "r"}, "secretName": "s", "regenerateAfter": "1y"},
            "spec.regenerateAfter: '1y' is not a duration",
        ),
        (
            DataKeySpec.parse,
            {"keyRingRef": {"name": "r"}, "secretName": "s", "rolloutRestartTargets": [{}]},
            "spec.rolloutRestartTargets needs a kind and a name",
        ),
        (KeyRingSpec.parse, None, "spec is required"),
        (KeyRingSpec.parse, {}, "spec.algorithm is required"),
        (KeyRingSpec.parse, {"algorithm": "AES256GCM", "deletionPolicy": "Keep"}, "Retain"),
        (RotationPolicySpec.parse, None, "spec is required"),
        (RotationPolicySpec.parse, {}, "spec.rotationPeriod is required"),
        (RotationPolicySpec.parse, {"rotationPeriod": "90d"}, "spec.rotationPeriod: '90d'"),
    ],
)
def test_an_unusable_spec_is_a_sentence_naming_the_field(
    parse: Any, raw: Any, message: str
) -> None:
    with pytest.raises(InvalidSpec) as caught:
        parse(raw)
    assert message in str(caught.value)
    assert "KeyError" not in str(caught.value)
    assert not str(caught.value).startswith("'")  # never a bare exception text like 'name'
