"""TokenReview caching, the review limits and the unverified JWT checks
(kustody.sidecar.unwrap.tokens), with a fake clock and a fake TokenReview answer."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from kustody.sidecar.unwrap.refusal import Refusal
from kustody.sidecar.unwrap.tokens import (
    Identity,
    ReviewLimits,
    TokenReviewer,
    identity_from,
    jwt_claims,
    peer_address,
    precheck,
)

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
        ({k: v for k, v in status().items() if k != "audiences"}, "TOKEN_WRONG_AUDIENCE"),
        ({**status(), "audiences": None}, "TOKEN_WRONG_AUDIENCE"),
        ({**status(), "audiences": []}, "TOKEN_WRONG_AUDIENCE"),
        ({**status(), "audiences": "kustody"}, "TOKEN_WRONG_AUDIENCE"),
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


# -- the front door: audiences required, refusals apart, limits before the review ------------

GOOD = jwt(exp=NOW + 3600, aud=["kustody"], sub="good")
OPEN = ReviewLimits(peer_rate=1e6, peer_burst=1e6, rate=1e6, burst=1e6, in_flight=1000)


def forged(i: int) -> str:
    return jwt(exp=NOW + 3600, aud=["kustody"], sub=f"forged-{i}")


class Api:
    """A TokenReview answer per token: authenticated only for GOOD."""

    def __init__(self, answer: Mapping[str, Any] | None = None) -> None:
        self.answer = answer
        self.tokens: list[str] = []
        self.gate: asyncio.Event | None = None

    async def __call__(self, token: str, audiences: Sequence[str]) -> Mapping[str, Any]:
        self.tokens.append(token)
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.answer is not None:
            return self.answer
        return status() if token == GOOD else {"authenticated": False}


async def outcome(reviewer: TokenReviewer, token: str, peer: str = "ipv4:10.0.0.1:5000") -> str:
    try:
        await reviewer.authenticate(token, peer)
    except Refusal as exc:
        return exc.reason
    return "ok"


def test_a_review_answer_without_audiences_is_refused_and_not_cached_as_a_success() -> None:
    answer = {k: v for k, v in status().items() if k != "audiences"}
    api = Api(answer)
    reviewer = TokenReviewer(api, clock=Clock(), limits=OPEN)

    async def run() -> None:
        assert await outcome(reviewer, GOOD) == "TOKEN_WRONG_AUDIENCE"
        assert await outcome(reviewer, GOOD) == "TOKEN_WRONG_AUDIENCE"  # (negative cache)
        assert len(api.tokens) == 1

    asyncio.run(run())


def test_a_flood_of_refused_tokens_never_evicts_a_good_entry() -> None:
    api = Api()
    reviewer = TokenReviewer(api, clock=Clock(), limits=OPEN, max_entries=2, max_refusals=8)

    async def run() -> None:
        assert await outcome(reviewer, GOOD) == "ok"
        results = [await outcome(reviewer, forged(i)) for i in range(500)]
        assert set(results) == {"TOKEN_INVALID"}
        assert await outcome(reviewer, GOOD) == "ok"
        assert api.tokens.count(GOOD) == 1  # still cached: no second review
        assert len(reviewer._refusals) == 8  # bounded, oldest dropped
        assert await outcome(reviewer, forged(499)) == "TOKEN_INVALID"
        assert api.tokens.count(forged(499)) == 1  # the newest refusal is still cached

    asyncio.run(run())


def test_new_tokens_are_limited_per_address_before_any_review() -> None:
    clock = Clock()
    limits = ReviewLimits(peer_rate=2, peer_burst=3, rate=100, burst=5, in_flight=100)
    api = Api()
    reviewer = TokenReviewer(api, clock=clock, monotonic=clock, limits=limits)

    async def run() -> None:
        a = [await outcome(reviewer, forged(i), "ipv4:10.0.0.1:1") for i in range(10)]
        assert a == ["TOKEN_INVALID"] * 3 + ["PEER_RATE_LIMITED"] * 7
        assert len(api.tokens) == 3  # the refused ones never reached the API
        # Another address has its own budget, until the global one is spent (burst 5).
        b = [await outcome(reviewer, forged(100 + i), "ipv4:10.0.0.2:1") for i in range(3)]
        assert b == ["TOKEN_INVALID"] * 2 + ["AUTH_RATE_LIMITED"]
        assert len(api.tokens) == 5
        # A cached good token needs no review, so no limit applies to it...
        # ...but a new good token waits for the budget like any other.
        assert await outcome(reviewer, GOOD, "ipv4:10.0.0.3:1") == "AUTH_RATE_LIMITED"
        clock.now += 1  # the buckets refill; admission refusals were not cached
        assert await outcome(reviewer, GOOD, "ipv4:10.0.0.3:1") == "ok"
        for _ in range(50):
            assert await outcome(reviewer, GOOD, "ipv4:10.0.0.1:1") == "ok"
        assert api.tokens.count(GOOD) == 1

    asyncio.run(run())


def test_reviews_in_flight_are_bounded_and_the_excess_refused_at_once() -> None:
    api = Api()
    limits = ReviewLimits(peer_rate=1e6, peer_burst=1e6, rate=1e6, burst=1e6, in_flight=4)
    reviewer = TokenReviewer(api, clock=Clock(), limits=limits)

    async def run() -> None:
        api.gate = asyncio.Event()
        waiting = [asyncio.create_task(outcome(reviewer, forged(i))) for i in range(4)]
        await asyncio.sleep(0.01)
        assert reviewer.in_flight == 4
        # Over the bound: refused without waiting (the gate is still closed).
        assert await asyncio.wait_for(outcome(reviewer, forged(99)), 1) == "AUTH_BUSY"
        # The same token as one in flight joins that review instead.
        joined = asyncio.create_task(outcome(reviewer, forged(0)))
        api.gate.set()
        assert await asyncio.gather(*waiting, joined) == ["TOKEN_INVALID"] * 5
        assert reviewer.in_flight == 0
        assert len(api.tokens) == 4

    asyncio.run(run())


def test_admission_refusals_cost_no_review_and_count_metrics() -> None:
    results: list[str] = []
    api = Api()
    limits = ReviewLimits(peer_rate=1, peer_burst=1, rate=1e6, burst=1e6, in_flight=10)
    reviewer = TokenReviewer(api, clock=Clock(), limits=limits, on_review=results.append)

    async def run() -> None:
        assert await outcome(reviewer, GOOD) == "ok"
        assert await outcome(reviewer, forged(1)) == "PEER_RATE_LIMITED"
        assert await outcome(reviewer, "not-a-jwt") == "TOKEN_MALFORMED"  # before any limit

    asyncio.run(run())
    assert results == ["ok"]


@pytest.mark.parametrize(
    ("peer", "address"),
    [
        ("ipv4:10.1.2.3:41234", "10.1.2.3"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:5000", "::1"),
        ("ipv6:[fe80::1%25eth0]:80", "fe80::1%25eth0"),
        ("unix:/run/x.sock", "unix:/run/x.sock"),
        ("", ""),
    ],
)
def test_peer_address_drops_the_port(peer: str, address: str) -> None:
    assert peer_address(peer) == address


def test_a_caller_that_gives_up_keeps_its_review_in_flight_and_fails_nobody_else() -> None:
    """Forged tokens with tiny deadlines must not get around the in-flight bound: the slot
    is held until the API server answers, whoever stopped waiting."""
    api = Api()
    limits = ReviewLimits(peer_rate=1e6, peer_burst=1e6, rate=1e6, burst=1e6, in_flight=1)
    reviewer = TokenReviewer(api, clock=Clock(), limits=limits)

    async def run() -> None:
        api.gate = asyncio.Event()
        leader = asyncio.create_task(outcome(reviewer, GOOD))
        await asyncio.sleep(0.01)
        follower = asyncio.create_task(outcome(reviewer, GOOD))
        await asyncio.sleep(0.01)
        leader.cancel()  # its caller went away (deadline, cancel)
        await asyncio.sleep(0.01)
        assert reviewer.in_flight == 1
        assert await outcome(reviewer, forged(1)) == "AUTH_BUSY"  # still bounded
        api.gate.set()
        assert await follower == "ok"  # not failed by the leader's cancellation
        assert reviewer.in_flight == 0
        assert await outcome(reviewer, GOOD) == "ok"  # and the answer was cached
        assert api.tokens == [GOOD]

    asyncio.run(run())
