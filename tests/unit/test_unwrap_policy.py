"""Authorisation rules (kustody.sidecar.unwrap.policy), DataKey grants and KeyRing namespace access
(kustody.sidecar.unwrap.datakeys)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from kustody.sidecar.unwrap.datakeys import (
    DataKeyDirectory,
    DataKeyGrant,
    NamespaceAccess,
    grant_from,
)
from kustody.sidecar.unwrap.policy import check_grant, check_keyring_allows, check_namespace
from kustody.sidecar.unwrap.refusal import Refusal
from kustody.sidecar.unwrap.tokens import Identity

ME = Identity("shop", "api")


def reason(fn: Any, *args: Any) -> str:
    with pytest.raises(Refusal) as err:
        fn(*args)
    return str(err.value.reason)


def test_namespace_must_be_the_tokens() -> None:
    check_namespace(ME, "shop")
    assert reason(check_namespace, ME, "bank") == "NAMESPACE_MISMATCH"


def test_consumers_keyring_and_existence() -> None:
    check_grant(ME, "orders", "payments", DataKeyGrant("payments", frozenset({"api"})))
    assert reason(check_grant, ME, "orders", "payments", None) == "DATAKEY_NOT_FOUND"
    other_ring = DataKeyGrant("other", frozenset({"api"}))
    assert reason(check_grant, ME, "orders", "payments", other_ring) == "KEYRING_MISMATCH"
    nobody = DataKeyGrant("payments", frozenset())
    assert reason(check_grant, ME, "orders", "payments", nobody) == "NOT_A_CONSUMER"


def test_omitted_consumers_mean_nobody() -> None:
    assert grant_from({"spec": {"keyRingRef": {"name": "p"}}}) == DataKeyGrant("p", frozenset())
    assert grant_from({"spec": {"keyRingRef": {"name": "p"}, "consumers": ["a"]}}).consumers == {
        "a"
    }


def test_directory_caches_found_and_missing_datakeys() -> None:
    now = [0.0]
    calls: list[tuple[str, str]] = []
    objects: dict[tuple[str, str], Mapping[str, Any]] = {
        ("shop", "orders"): {"spec": {"keyRingRef": {"name": "p"}, "consumers": ["api"]}}
    }

    async def fetch(ns: str, name: str) -> Mapping[str, Any] | None:
        calls.append((ns, name))
        return objects.get((ns, name))

    directory = DataKeyDirectory(fetch, ttl=5, negative_ttl=2, clock=lambda: now[0])

    async def run() -> None:
        results = await asyncio.gather(*(directory.grant("shop", "orders") for _ in range(5)))
        assert all(r is not None and "api" in r.consumers for r in results)
        assert calls == [("shop", "orders")]
        del objects[("shop", "orders")]  # deleted: still cached for up to ttl
        now[0] += 4
        assert await directory.grant("shop", "orders") is not None
        now[0] += 2
        assert await directory.grant("shop", "orders") is None
        assert len(calls) == 2

    asyncio.run(run())


def test_the_keyring_must_exist_and_allow_the_namespace() -> None:
    check_keyring_allows(ME, "payments", True)
    assert reason(check_keyring_allows, ME, "payments", False) == "NAMESPACE_NOT_ALLOWED"
    assert reason(check_keyring_allows, ME, "payments", None) == "KEYRING_NOT_FOUND"


def test_namespace_access_follows_names_and_selector_within_the_ttl() -> None:
    now = [0.0]
    rings: dict[str, Mapping[str, Any]] = {
        "named": {"spec": {"allowedNamespaces": {"names": ["shop", "bank"]}}},
        "labelled": {"spec": {"allowedNamespaces": {"selector": {"matchLabels": {"team": "pay"}}}}},
        "empty": {"spec": {}},
    }
    namespaces: dict[str, Mapping[str, Any]] = {
        "shop": {"metadata": {"labels": {"team": "pay"}}},
        "bank": {"metadata": {}},
    }
    gets: list[str] = []

    async def keyring(name: str) -> Mapping[str, Any] | None:
        gets.append(f"kr/{name}")
        return rings.get(name)

    async def namespace(name: str) -> Mapping[str, Any] | None:
        gets.append(f"ns/{name}")
        return namespaces.get(name)

    access = NamespaceAccess(keyring, namespace, ttl=5, negative_ttl=2, clock=lambda: now[0])

    async def run() -> None:
        assert await access.allowed("named", "shop") is True
        assert await access.allowed("named", "other") is False
        assert await access.allowed("labelled", "shop") is True
        assert await access.allowed("labelled", "bank") is False
        assert await access.allowed("labelled", "gone") is False  # no Namespace, no labels
        assert await access.allowed("empty", "shop") is False
        assert await access.allowed("missing", "shop") is None
        assert "ns/shop" in gets
        assert not [g for g in gets if g.startswith("ns/") and g != "ns/shop" and
                    g not in ("ns/bank", "ns/gone")]  # fmt: skip
        # Revocation: names edited, label removed -> refused once the cache expires.
        rings["named"] = {"spec": {"allowedNamespaces": {"names": ["bank"]}}}
        namespaces["shop"] = {"metadata": {"labels": {}}}
        now[0] += 4
        assert await access.allowed("named", "shop") is True  # still cached
        assert await access.allowed("labelled", "shop") is True
        now[0] += 2
        assert await access.allowed("named", "shop") is False
        assert await access.allowed("labelled", "shop") is False

    asyncio.run(run())
    # names-only KeyRings never read the Namespace
    assert "ns/other" not in gets
