"""The associated-data encoding is injective and rejects oversized input."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kustody.domain.aad import Binding, KmsBinding, associated_data
from kustody.domain.errors import InvalidArgument

names = st.text(min_size=1, max_size=20)
contexts = st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=5)
bindings = st.builds(Binding, names, names, contexts)


@given(bindings, bindings)
def test_encoding_is_injective(a: Binding, b: Binding) -> None:
    assert (a.encode() == b.encode()) == (
        (a.namespace, a.name, dict(a.context)) == (b.namespace, b.name, dict(b.context))
    )


def test_context_order_does_not_matter() -> None:
    a = Binding("ns", "dk", {"a": "1", "b": "2"})
    b = Binding("ns", "dk", {"b": "2", "a": "1"})
    assert a.encode() == b.encode()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (Binding("ab", "c"), Binding("a", "bc")),
        (Binding("n", "d", {"k": "v=x"}), Binding("n", "d", {"k=v": "x"})),
        (Binding("n", "d", {"": "ab"}), Binding("n", "d", {"a": "b"})),
    ],
)
def test_shifted_boundaries_differ(a: Binding, b: Binding) -> None:
    assert a.encode() != b.encode()


def test_kms_and_data_key_bindings_never_collide() -> None:
    assert KmsBinding("ns").encode() != Binding("ns", "x").encode()
    assert KmsBinding("ns").encode()[:1] == b"K"


def test_header_is_prefix_of_aad() -> None:
    aad = associated_data(b"HEADER", Binding("ns", "dk"))
    assert aad.startswith(b"HEADER")


@pytest.mark.parametrize(
    "make",
    [
        lambda: Binding("", "dk"),
        lambda: Binding("ns", ""),
        lambda: Binding("n" * 254, "dk"),
        lambda: Binding("ns", "dk", {str(i): "" for i in range(65)}),
        lambda: Binding("ns", "dk", {"k": "v" * 1025}),
        lambda: Binding("ns", "dk", {"\ud800": "v"}),
        lambda: KmsBinding(""),
    ],
)
def test_invalid_bindings_raise_typed_error(make: object) -> None:
    with pytest.raises(InvalidArgument):
        make()  # type: ignore[operator]


def test_binding_context_is_immutable() -> None:
    ctx = {"a": "1"}
    binding = Binding("ns", "dk", ctx)
    ctx["a"] = "2"
    assert binding.context["a"] == "1"


@given(
    st.text(min_size=1, max_size=300),
    st.text(min_size=1, max_size=300),
    st.dictionaries(st.text(max_size=300), st.text(max_size=1100), max_size=5),
)
def test_fast_encoding_matches_the_validating_one(ns: str, name: str, ctx: dict[str, str]) -> None:
    """Binding caches a fast encoding; it must equal the field-by-field validating encoder."""
    try:
        binding = Binding(ns, name, ctx)
    except InvalidArgument:
        return
    assert binding.encode() == binding._encode()
