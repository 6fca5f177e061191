"""kustody.kube.decode: API JSON with the field names shared between objects."""

from __future__ import annotations

import json

import pytest
from kustody.kube import decode


def test_it_decodes_what_json_decodes() -> None:
    text = json.dumps(
        {"metadata": {"name": "a", "labels": {"x": "1"}}, "items": [{"k": [1, 2.5, None, True]}]}
    )
    assert decode.loads(text) == json.loads(text)
    assert decode.loads(text.encode()) == json.loads(text)


def test_two_objects_share_their_keys() -> None:
    one = decode.loads('{"metadata": {"resourceVersion": "1"}}')
    two = decode.loads(b'{"metadata": {"resourceVersion": "2"}}')
    (k1,), (k2,) = one["metadata"].keys(), two["metadata"].keys()
    assert k1 == k2 == "resourceVersion"
    assert k1 is k2  # one string for both: the point of it


def test_the_table_of_keys_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decode, "_keys", {})
    monkeypatch.setattr(decode, "MAX_KEYS", 3)
    document = json.dumps({f"user-annotation-{i}": i for i in range(10)})
    assert decode.loads(document) == json.loads(document)  # still decoded whole
    assert len(decode._keys) <= 3
