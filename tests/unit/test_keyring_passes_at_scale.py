"""What keeps a KeyRing pass cheap when it has thousands of DataKeys: each DataKey's wrapping
versions are parsed once per resourceVersion, and the KeyRing looks again less often."""

from __future__ import annotations

from kustody.testing.fakes import FakeOperator, datakey


def _dk(name: str, rv: str, versions: list[int]) -> dict[str, object]:
    obj = datakey(name, "ns", "ring")
    obj["metadata"] = {**obj["metadata"], "uid": f"uid-{name}", "resourceVersion": rv}
    obj["status"] = {
        "generations": [
            {"generation": i + 1, "keyId": i + 1, "keyRingVersion": v, "wrappedKey": "x"}
            for i, v in enumerate(versions)
        ]
    }
    return obj


def test_wrapping_versions_follow_the_resource_version() -> None:
    rt = FakeOperator().rt
    first = _dk("a", "10", [1, 2])
    assert rt.wrapping_versions(first) == frozenset({1, 2})
    same_version_other_status = _dk("a", "10", [3])
    assert rt.wrapping_versions(same_version_other_status) == frozenset({1, 2})  # memoised
    assert rt.wrapping_versions(_dk("a", "11", [3])) == frozenset({3})  # a new version: parsed
    assert rt.wrapping_versions(_dk("b", "", [4])) == frozenset({4})  # no version: never cached
    assert rt.wrapping_versions(_dk("b", "", [5])) == frozenset({5})


def test_a_keyring_with_many_datakeys_looks_again_less_often() -> None:
    rt = FakeOperator().rt
    assert rt.keyring_delay("ring") == 1.0
    for i in range(6000):
        rt.datakeys.put(_dk(f"d{i}", "1", [1]))
    assert rt.datakeys.count("ring") == 6000
    assert rt.keyring_delay("ring") == 3.0
    assert rt.keyring_delay("other") == 1.0
