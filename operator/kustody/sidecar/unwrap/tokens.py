"""Who is calling: projected ServiceAccount tokens checked with the TokenReview API, cached.

The JWT payload is parsed *without* verifying it: only to refuse early what cannot succeed
(not a JWT, already expired, not for our audience) and to bound the cache lifetime by the
token's ``exp``. Acceptance always comes from a TokenReview by the API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kustody.client.errors import Reason
from kustody.sidecar.unwrap.ratelimit import RateLimiter
from kustody.sidecar.unwrap.refusal import Refusal

SA_PREFIX = "system:serviceaccount:"
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
MAX_TOKEN_CHARS = 16 * 1024

# (token, audiences) -> the TokenReview's status (a dict, as the API returns it)
Review = Callable[[str, Sequence[str]], Awaitable[Mapping[str, Any]]]


@dataclass(frozen=True)
class Identity:
    """A verified ServiceAccount."""

    namespace: str
    service_account: str
    uid: str = ""
    pod: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.service_account}"


def jwt_claims(token: str) -> dict[str, Any] | None:
    """The payload of a compact JWS, unverified; None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3 or not all(parts):
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return claims if isinstance(claims, dict) else None


def _audiences(claims: Mapping[str, Any]) -> list[str]:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return [aud]
    return [a for a in aud if isinstance(a, str)] if isinstance(aud, list) else []


def _expiry(claims: Mapping[str, Any]) -> float | None:
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def precheck(token: str, audience: str, now: float) -> dict[str, Any]:
    """Refuse what no TokenReview could accept; return the unverified claims otherwise."""
    if len(token) > MAX_TOKEN_CHARS:
        raise Refusal(Reason.TOKEN_MALFORMED, "the token is too long")
    claims = jwt_claims(token)
    if claims is None:
        raise Refusal(Reason.TOKEN_MALFORMED, "the token is not a JWT")
    exp = _expiry(claims)
    if exp is not None and exp <= now:
        raise Refusal(Reason.TOKEN_EXPIRED, "the token has expired")
    if "aud" in claims and audience not in _audiences(claims):
        raise Refusal(
            Reason.TOKEN_WRONG_AUDIENCE,
            f"the token is not for audience {audience!r} (use a projected token with "
            f"audience {audience!r})",
        )
    return claims


def identity_from(status: Mapping[str, Any], audience: str) -> Identity:
    """The ServiceAccount a TokenReview status names, or the refusal it stands for.

    ``status.audiences`` must be present and contain ``audience``: a reply without it comes
    from an authenticator that did not check the audience (a token for some other service
    would pass), so it is refused."""
    if not status.get("authenticated"):
        raise Refusal(Reason.TOKEN_INVALID, "the API server did not authenticate the token")
    audiences = status.get("audiences")
    if not isinstance(audiences, list) or audience not in audiences:
        raise Refusal(
            Reason.TOKEN_WRONG_AUDIENCE,
            f"the TokenReview did not confirm the audience {audience!r}",
        )
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(SA_PREFIX) or username.count(":") != 3:
        raise Refusal(Reason.NOT_A_SERVICE_ACCOUNT, "only ServiceAccount tokens may unwrap")
    namespace, name = username[len(SA_PREFIX) :].split(":")
    pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
    return Identity(namespace, name, str(user.get("uid") or ""), str(pods[0]) if pods else "")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def peer_address(peer: str) -> str:
    """The client address of a gRPC peer string, without the port: ``ipv4:10.0.0.7:5123`` ->
    ``10.0.0.7``, ``ipv6:[::1]:5123`` (or ``%5B::1%5D``) -> ``::1``; others unchanged."""
    scheme, sep, rest = peer.partition(":")
    if not sep or scheme not in ("ipv4", "ipv6"):
        return peer
    rest = rest.replace("%5B", "[").replace("%5D", "]").replace("%5b", "[").replace("%5d", "]")
    if rest.startswith("["):
        return rest[1 : rest.find("]")] if "]" in rest else rest[1:]
    host, colon, port = rest.rpartition(":")
    return host if colon and port.isdigit() else rest


@dataclass(frozen=True)
class ReviewLimits:
    """What a caller whose token is not cached may cost: TokenReviews per client address and
    in total (token buckets), and at most ``in_flight`` TokenReviews at once."""

    peer_rate: float = 10.0
    peer_burst: float = 20.0
    rate: float = 50.0
    burst: float = 100.0
    in_flight: int = 16

    def __post_init__(self) -> None:
        if min(self.peer_rate, self.rate) <= 0 or min(self.peer_burst, self.burst) < 1:
            raise ValueError("review rates must be > 0 and bursts >= 1")
        if self.in_flight < 1:
            raise ValueError("in_flight must be >= 1")


class TokenReviewer:
    """Authenticates tokens, caching each result by SHA-256 of the token.

    * A success is cached until the token's ``exp`` or ``max_ttl`` seconds, whichever comes
      first, in a cache of at most ``max_entries`` that only successes enter.
    * A TokenReview that says no is cached ``negative_ttl`` seconds in a *separate* cache of
      at most ``max_refusals`` (oldest dropped first), so a flood of bad tokens can neither
      grow memory nor evict a good caller's entry.
    * A token that is in neither cache costs a TokenReview, and is admitted to one only
      within :class:`ReviewLimits` — per client address, in total, and in flight; beyond them
      it is refused at once (``PEER_RATE_LIMITED``, ``AUTH_RATE_LIMITED``, ``AUTH_BUSY``;
      retryable), without asking the API server. Nothing about it is cached.
    * API failures are not cached. Concurrent calls with the same token share one review.
    """

    def __init__(
        self,
        review: Review,
        *,
        audience: str = "kustody",
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        max_refusals: int = 4_096,
        limits: ReviewLimits | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        on_review: Callable[[str], None] | None = None,
    ) -> None:
        self._review = review
        self.audience = audience
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._max_refusals = max_refusals
        self.limits = limits or ReviewLimits()
        self._clock = clock
        self._cache: dict[str, tuple[float, Identity]] = {}
        self._refusals: collections.OrderedDict[str, tuple[float, Refusal]] = (
            collections.OrderedDict()
        )
        self._pending: dict[str, asyncio.Future[Identity]] = {}
        self._peers = RateLimiter(self.limits.peer_rate, self.limits.peer_burst, clock=monotonic)
        self._global = RateLimiter(self.limits.rate, self.limits.burst, clock=monotonic)
        self._on_review = on_review
        self.in_flight = 0
        self.reviews = 0  # TokenReview calls made (for tests and the benchmark)

    async def authenticate(self, token: str, peer: str = "") -> Identity:
        digest = token_digest(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            if cached[0] > now:
                return cached[1]
            del self._cache[digest]
        refused = self._refusals.get(digest)
        if refused is not None:
            if refused[0] > now:
                raise refused[1]
            del self._refusals[digest]
        pending = self._pending.get(digest)
        if pending is None:
            claims = precheck(token, self.audience, now)
            self._admit(peer)
            # The review runs in its own task that no caller's cancellation reaches: a caller
            # that gives up (or runs out of time) neither frees its in-flight slot while the
            # API request is still running, nor fails the callers sharing the review.
            pending = asyncio.ensure_future(self._authenticate(token, digest, claims))
            self._pending[digest] = pending
            pending.add_done_callback(lambda task: self._reviewed(digest, task))
        return await asyncio.shield(pending)

    def _reviewed(self, digest: str, task: asyncio.Future[Identity]) -> None:
        if self._pending.get(digest) is task:
            del self._pending[digest]
        if not task.cancelled():
            task.exception()  # retrieved: no "never retrieved" warning when nobody waits

    def _admit(self, peer: str) -> None:
        """Refuse, without a TokenReview, what is over the review limits."""
        limits = self.limits
        if self.in_flight >= limits.in_flight:
            raise Refusal(
                Reason.AUTH_BUSY,
                f"{limits.in_flight} TokenReviews are already in flight; retry with backoff",
            )
        if not self._peers.allow(peer_address(peer)):
            raise Refusal(
                Reason.PEER_RATE_LIMITED,
                f"more than {limits.peer_rate:g} new tokens/s (burst {limits.peer_burst:g}) "
                "from this address; retry with backoff",
            )
        if not self._global.allow(""):
            raise Refusal(
                Reason.AUTH_RATE_LIMITED,
                f"more than {limits.rate:g} new tokens/s (burst {limits.burst:g}) in total; "
                "retry with backoff",
            )

    async def _authenticate(self, token: str, digest: str, claims: Mapping[str, Any]) -> Identity:
        self.reviews += 1
        self.in_flight += 1
        try:
            status = await self._review(token, [self.audience])
        except BaseException:
            self._count("error")
            raise
        finally:
            self.in_flight -= 1
        try:
            identity = identity_from(status, self.audience)
        except Refusal as refusal:
            self._count("refused")
            self._refuse(digest, self._clock() + self.negative_ttl, refusal)
            raise
        self._count("ok")
        exp = _expiry(claims)
        expires = self._clock() + self.max_ttl
        self._store(digest, expires if exp is None else min(exp, expires), identity)
        return identity

    def _count(self, result: str) -> None:
        if self._on_review is not None:
            self._on_review(result)

    def _refuse(self, digest: str, expires: float, refusal: Refusal) -> None:
        # One TTL for all: insertion order is expiry order, so the oldest go first.
        refusals = self._refusals
        refusals.pop(digest, None)
        while len(refusals) >= self._max_refusals:
            refusals.popitem(last=False)
        refusals[digest] = (expires, refusal)

    def _store(self, digest: str, expires: float, identity: Identity) -> None:
        if len(self._cache) >= self._max_entries:
            now = self._clock()
            for key in [k for k, (e, _) in self._cache.items() if e <= now]:
                del self._cache[key]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (expires, identity)
