"""Who is calling: projected ServiceAccount tokens checked with the TokenReview API, cached.

The JWT payload is parsed *without* verifying it: only to refuse early what cannot succeed
(not a JWT, already expired, not for our audience) and to bound the cache lifetime by the
token's ``exp``. Acceptance always comes from a TokenReview by the API server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kustody.client.errors import Reason
from kustody.unwrap.refusal import Refusal

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
    """The ServiceAccount a TokenReview status names, or the refusal it stands for."""
    if not status.get("authenticated"):
        raise Refusal(Reason.TOKEN_INVALID, "the API server did not authenticate the token")
    audiences = status.get("audiences")
    if audiences is not None and audience not in audiences:
        raise Refusal(Reason.TOKEN_WRONG_AUDIENCE, f"the token is not for audience {audience!r}")
    user = status.get("user") or {}
    username = str(user.get("username") or "")
    if not username.startswith(SA_PREFIX) or username.count(":") != 3:
        raise Refusal(Reason.NOT_A_SERVICE_ACCOUNT, "only ServiceAccount tokens may unwrap")
    namespace, name = username[len(SA_PREFIX) :].split(":")
    pods = (user.get("extra") or {}).get(POD_NAME_EXTRA) or []
    return Identity(namespace, name, str(user.get("uid") or ""), str(pods[0]) if pods else "")


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class TokenReviewer:
    """Authenticates tokens, caching each result by SHA-256 of the token.

    A success is cached until the token's ``exp`` or ``max_ttl`` seconds, whichever comes
    first; a TokenReview that says no is cached for ``negative_ttl`` seconds (a burst of bad
    calls then costs one review). API failures are not cached. Concurrent calls with the same
    token share one review.
    """

    def __init__(
        self,
        review: Review,
        *,
        audience: str = "kustody",
        max_ttl: float = 300.0,
        negative_ttl: float = 5.0,
        max_entries: int = 10_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._review = review
        self.audience = audience
        self.max_ttl = max_ttl
        self.negative_ttl = negative_ttl
        self._max_entries = max_entries
        self._clock = clock
        self._cache: dict[str, tuple[float, Identity | Refusal]] = {}
        self._pending: dict[str, asyncio.Future[Identity]] = {}
        self.reviews = 0  # TokenReview calls made (for tests and the benchmark)

    async def authenticate(self, token: str) -> Identity:
        digest = token_digest(token)
        now = self._clock()
        cached = self._cache.get(digest)
        if cached is not None:
            expires, result = cached
            if expires > now:
                if isinstance(result, Refusal):
                    raise result
                return result
            del self._cache[digest]
        pending = self._pending.get(digest)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity] = asyncio.get_running_loop().create_future()
        self._pending[digest] = future
        try:
            identity = await self._authenticate(token, digest, now)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        else:
            future.set_result(identity)
            return identity
        finally:
            del self._pending[digest]

    async def _authenticate(self, token: str, digest: str, now: float) -> Identity:
        claims = precheck(token, self.audience, now)
        self.reviews += 1
        status = await self._review(token, [self.audience])
        try:
            identity = identity_from(status, self.audience)
        except Refusal as refusal:
            self._store(digest, self._clock() + self.negative_ttl, refusal)
            raise
        exp = _expiry(claims)
        expires = self._clock() + self.max_ttl
        self._store(digest, expires if exp is None else min(exp, expires), identity)
        return identity

    def _store(self, digest: str, expires: float, result: Identity | Refusal) -> None:
        if len(self._cache) >= self._max_entries:
            now = self._clock()
            for key in [k for k, (e, _) in self._cache.items() if e <= now]:
                del self._cache[key]
            while len(self._cache) >= self._max_entries:
                del self._cache[next(iter(self._cache))]
        self._cache[digest] = (expires, result)
