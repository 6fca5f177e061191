"""The Secret a DataKey publishes: entries, managed labels, the context document, drift."""

from __future__ import annotations

import base64
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.secret import (
    ANNOTATION_GENERATION,
    LABEL_DATAKEY,
    LABEL_KEYRING,
    LABEL_VERSION,
    MANAGED_BY,
    MANAGER,
    SecretContent,
    context_document,
    differs,
    render,
)
from kustody.domain.specs import DataKeySpec

WRAPPED = "kustody:v1:payments:3:bm9uY2U:Y2lwaGVydGV4dA"


def spec(**extra: Any) -> DataKeySpec:
    return DataKeySpec.parse({"keyRingRef": {"name": "payments"}, "secretName": "dek", **extra})


def decoded(content: SecretContent) -> dict[str, str]:
    return {k: base64.b64decode(v, validate=True).decode() for k, v in content.data.items()}


def as_live(content: SecretContent) -> dict[str, Any]:
    return {
        "metadata": {"labels": dict(content.labels), "annotations": dict(content.annotations)},
        "data": dict(content.data),
        "type": "kustody.io/wrapped-key",
    }


def test_render_default_entries() -> None:
    content = render("shop", "ledger", spec(), wrapped=WRAPPED, version=3, generation=1)
    data = decoded(content)
    assert set(data) == {"wrapped-key", "key-ring", "key-version", "encryption-context"}
    assert data["wrapped-key"] == WRAPPED
    assert data["key-ring"] == "payments"
    assert data["key-version"] == "3"
    assert json.loads(data["encryption-context"]) == {
        "keyRing": "payments",
        "namespace": "shop",
        "dataKey": "ledger",
        "encryptionContext": {},
    }


def test_render_managed_labels_and_annotations() -> None:
    s = spec(
        template={
            "metadata": {
                "labels": {"app.kubernetes.io/name": "ledger"},
                "annotations": {"example.com/owner": "team"},
            }
        }
    )
    content = render("shop", "ledger", s, wrapped=WRAPPED, version=7, generation=2)
    assert content.labels == {
        "app.kubernetes.io/name": "ledger",
        MANAGED_BY: MANAGER,
        LABEL_DATAKEY: "ledger",
        LABEL_KEYRING: "payments",
        LABEL_VERSION: "7",
    }
    assert content.labels[MANAGED_BY] == "kustody"
    assert content.annotations == {"example.com/owner": "team", ANNOTATION_GENERATION: "2"}


def test_user_labels_cannot_override_managed_labels() -> None:
    s = spec(template={"metadata": {"labels": {MANAGED_BY: "helm"}}})
    content = render("shop", "ledger", s, wrapped=WRAPPED, version=1, generation=1)
    assert content.labels[MANAGED_BY] == MANAGER


def test_custom_key_names_and_plaintext() -> None:
    s = spec(
        template={"keys": {"wrappedKey": "dek.wrapped", "plaintext": "dek.raw"}},
        exposePlaintext=True,
    )
    raw = bytes(range(32))
    content = render("shop", "ledger", s, wrapped=WRAPPED, version=1, generation=1, plaintext=raw)
    assert set(content.data) == {
        "dek.wrapped",
        "key-ring",
        "key-version",
        "encryption-context",
        "dek.raw",
    }
    assert base64.b64decode(content.data["dek.raw"]) == raw
    assert base64.b64decode(content.data["dek.wrapped"]).decode() == WRAPPED


def test_no_plaintext_entry_without_plaintext() -> None:
    content = render("shop", "ledger", spec(), wrapped=WRAPPED, version=1, generation=1)
    assert "plaintext-key" not in content.data
    # Nothing secret in labels or annotations.
    assert all(WRAPPED not in v for v in (*content.labels.values(), *content.annotations.values()))


def test_context_document_is_canonical() -> None:
    a = spec(encryptionContext={"b": "2", "a": "1", "c": "3"})
    b = spec(encryptionContext={"c": "3", "a": "1", "b": "2"})
    doc = context_document("shop", "ledger", a)
    assert doc == context_document("shop", "ledger", b)
    # Sorted keys at every level, no whitespace: byte-identical wherever it is computed.
    assert doc == (
        '{"dataKey":"ledger","encryptionContext":{"a":"1","b":"2","c":"3"},'
        '"keyRing":"payments","namespace":"shop"}'
    )


context_maps = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=6)


@given(context_maps, st.randoms(use_true_random=False))
def test_context_document_ignores_insertion_order(ctx: dict[str, str], rnd: Any) -> None:
    items = list(ctx.items())
    rnd.shuffle(items)
    doc = context_document("ns", "dk", spec(encryptionContext=ctx))
    assert doc == context_document("ns", "dk", spec(encryptionContext=dict(items)))
    parsed = json.loads(doc)
    assert parsed["encryptionContext"] == ctx
    assert doc == json.dumps(parsed, sort_keys=True, separators=(",", ":"))


def test_context_binds_namespace_and_name() -> None:
    s = spec()
    assert context_document("a", "dk", s) != context_document("b", "dk", s)
    assert context_document("ns", "a", s) != context_document("ns", "b", s)


# -- differs ----------------------------------------------------------------------------------


def desired() -> SecretContent:
    return render("shop", "ledger", spec(), wrapped=WRAPPED, version=3, generation=1)


def test_identical_live_secret_does_not_differ() -> None:
    assert not differs(desired(), as_live(desired()))


def test_extra_labels_and_annotations_from_others_are_fine() -> None:
    live = as_live(desired())
    live["metadata"]["labels"]["argocd.argoproj.io/instance"] = "payments"
    live["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"] = "{}"
    live["metadata"]["resourceVersion"] = "42"
    assert not differs(desired(), live)


def test_changed_or_missing_label_is_noticed() -> None:
    live = as_live(desired())
    live["metadata"]["labels"][LABEL_VERSION] = "2"
    assert differs(desired(), live)
    live = as_live(desired())
    del live["metadata"]["labels"][MANAGED_BY]
    assert differs(desired(), live)


def test_changed_annotation_is_noticed() -> None:
    live = as_live(desired())
    live["metadata"]["annotations"][ANNOTATION_GENERATION] = "0"
    assert differs(desired(), live)


def test_changed_missing_or_extra_data_is_noticed() -> None:
    live = as_live(desired())
    live["data"]["wrapped-key"] = base64.b64encode(b"tampered").decode()
    assert differs(desired(), live)
    live = as_live(desired())
    del live["data"]["key-version"]
    assert differs(desired(), live)
    # A leftover plaintext entry (exposePlaintext turned off) must be removed.
    live = as_live(desired())
    live["data"]["plaintext-key"] = base64.b64encode(b"k" * 32).decode()
    assert differs(desired(), live)


def test_empty_or_missing_live_parts() -> None:
    assert differs(desired(), {})
    assert differs(desired(), {"metadata": None, "data": None})
    live = as_live(desired())
    live["metadata"]["annotations"] = None
    assert differs(desired(), live)


def test_new_version_differs_from_old_secret() -> None:
    old = as_live(desired())
    new = render("shop", "ledger", spec(), wrapped=WRAPPED + "x", version=4, generation=1)
    assert differs(new, old)
    assert not differs(new, as_live(new))
