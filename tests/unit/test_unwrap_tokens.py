"""TokenReview caching and the unverified JWT checks (kustody.unwrap.tokens), fake clock."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from kustody.unwrap.refusal import Refusal
from kustody.unwrap.tokens import Identity, TokenReviewer, identity_from, jwt_claims, precheck

NOW = 1_800_000_000.0


def jwt(**claims: Any) -> str:
    def part(doc: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(doc).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.c2ln"


def status(ns: str = "shop", sa: str = "api", ok: bool = True) -> dict[str, Any]:
    return {
        "authenticated": ok,
        "audiences": ["kustody"],
        "user": {
            "username": f"system:serviceaccount:{ns}:{sa}",
            "uid": "u1",
            "extra": {"authentication.kubernetes.io/pod-name": ["api-0"]},
        },
    }


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


class FakeApi:
    def __init__(self, result: Mapping[str, Any]) -> None:
        self.result = result
        self.calls = 0

    async def __call__(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        assert list(audiences) == ["kustody"]
        self.calls += 1
        await asyncio.sleep(0)
        return self.result


def test_jwt_claims_parses_the_payload_without_padding() -> None:
    assert jwt_claims(jwt(exp=5, aud=["kustody"])) == {"exp": 5, "aud": ["kustody"]}


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a..c", "a.!!!.c", "a.bnVsbA.c", "x.W10.y"])
def test_jwt_claims_rejects_what_is_not_a_jws(token: str) -> None:
    assert jwt_claims(token) is None


def test_precheck_refuses_expired_wrong_audience_and_garbage() -> None:
    with pytest.raises(Refusal) as err:
        precheck(jwt(exp=NOW - 1, aud="kustody"), "kustody", NOW)
    assert err.value.reason == "TOKEN_EXPIRED"
    with pytest.raises(Refusal) as err:
        precheck(jwt(exp=NOW + 60, aud=["https://kubernetes.default.svc"]), "kustody", NOW)
    assert err.value.reason == "TOKEN_WRONG_AUDIENCE"
    with pytest.raises(Refusal) as err:
        precheck("opaque-static-token", "kustody", NOW)
    assert err.value.reason == "TOKEN_MALFORMED"
    assert precheck(jwt(exp=NOW + 60, aud=["x", "kustody"]), "kustody", NOW)["exp"] == NOW + 60


def test_identity_comes_from_the_review_and_must_be_a_service_account() -> None:
    assert identity_from(status(), "kustody") == Identity("shop", "api", "u1", "api-0")
    for bad, reason in (
        ({**status(), "authenticated": False}, "TOKEN_INVALID"),
        ({**status(), "audiences": ["other"]}, "TOKEN_WRONG_AUDIENCE"),
        ({**status(), "user": {"username": "alice"}}, "NOT_A_SERVICE_ACCOUNT"),
        (
            {**status(), "user": {"username": "system:serviceaccount:a:b:c"}},
            "NOT_A_SERVICE_ACCOUNT",
        ),
    ):
        with pytest.raises(Refusal) as err:
            identity_from(bad, "kustody")
        assert err.value.reason == reason


def test_a_review_is_cached_until_the_token_expires_not_longer() -> None:
    clock, api = Clock(), FakeApi(status())
    reviewer = TokenReviewer(api, max_ttl=300, clock=clock)
    token = jwt(exp=NOW + 60, aud=["kustody"])

    async def run() -> None:
        assert (await reviewer.authenticate(token)).key == "shop/api"
        clock.now += 59
        await reviewer.authenticate(token)
        assert api.calls == 1  # cached
        clock.now += 2  # past exp: the precheck refuses without asking the API again
        with pytest.raises(Refusal) as err:
            await reviewer.authenticate(token)
        assert err.value.reason == "TOKEN_EXPIRED"
        assert api.calls == 1

    asyncio.run(run())


def test_a_review_is_cached_at_most_max_ttl() -> None:
    clock, api = Clock(), FakeApi(status())
    reviewer = TokenReviewer(api, max_ttl=300, clock=clock)
    token = jwt(exp=NOW + 3600, aud=["kustody"])

    async def run() -> None:
        await reviewer.authenticate(token)
        clock.now += 299
        await reviewer.authenticate(token)
        assert api.calls == 1
        clock.now += 2
        await reviewer.authenticate(token)
        assert api.calls == 2

    asyncio.run(run())


def test_a_refusal_is_cached_briefly_and_concurrent_calls_share_one_review() -> None:
    clock, api = Clock(), FakeApi(status(ok=False))
    reviewer = TokenReviewer(api, negative_ttl=5, clock=clock)
    token = jwt(exp=NOW + 3600, aud=["kustody"])

    async def attempt() -> str:
        try:
            await reviewer.authenticate(token)
        except Refusal as exc:
            return exc.reason
        return "ok"

    async def run() -> None:
        assert await asyncio.gather(*(attempt() for _ in range(10))) == ["TOKEN_INVALID"] * 10
        assert api.calls == 1
        clock.now += 4
        assert await attempt() == "TOKEN_INVALID"
        assert api.calls == 1
        clock.now += 2
        api.result = status()
        assert await attempt() == "ok"
        assert api.calls == 2

    asyncio.run(run())
