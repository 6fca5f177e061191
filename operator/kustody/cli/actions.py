"""``kustody rotate``, ``kustody rewrap`` and ``kustody restore``: requests to the operator.

Each sets one annotation on the KeyRing (the operator acts on it and records that it did);
``rewrap`` and ``rotate --wait`` then follow the DataKeys until each is wrapped under the
primary version, with a progress bar, and stop when done or at ``--timeout``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kustody.cli import target
from kustody.cli.report import datakey_keyring
from kustody.domain.specs import RESTORE_ANNOTATION, REWRAP_ANNOTATION, ROTATE_ANNOTATION
from kustody.domain.timestamps import format_micro_time
from kustody.errors import UserError

if TYPE_CHECKING:
    from kustody.kube.api import Kube

_POLL = 0.5


def _now_stamp() -> str:
    return format_micro_time(dt.datetime.now(dt.UTC))


async def _annotate(kube: Kube, ring: str, key: str, value: str, what: str) -> dict[str, Any]:
    """Set one annotation on a KeyRing: how the CLI asks the operator for an action."""
    from kustody.kube.errors import KubeError, NotFound
    from kustody.kube.resources import KEYRINGS

    try:
        return await kube.patch(KEYRINGS, ring, {"metadata": {"annotations": {key: value}}})
    except NotFound:
        raise UserError(f"KeyRing {ring} does not exist") from None
    except KubeError as exc:
        raise UserError(f"could not request {what} of {ring}: {exc}") from None


async def _keyring(kube: Kube, ring: str) -> dict[str, Any]:
    from kustody.kube.resources import KEYRINGS

    return await kube.get(KEYRINGS, ring)


async def _rewrap_policy(kube: Kube, keyring: Mapping[str, Any]) -> str:
    from kustody.kube.resources import ROTATION_POLICIES

    ref = ((keyring.get("spec") or {}).get("rotationPolicyRef") or {}).get("name")
    if not ref:
        return "Automatic"
    policy = await kube.get_or_none(ROTATION_POLICIES, ref)
    return str(((policy or {}).get("spec") or {}).get("rewrap") or "Automatic")


async def _wait_rewrapped(
    kube: Kube, ring: str, version: int, namespace: str | None, deadline: float
) -> int:
    """Follow the ring's DataKeys until each is wrapped under ``version`` (or a later one)."""
    from kustody.cli.progress import Bar
    from kustody.kube.resources import DATAKEYS

    where = f" in {namespace}" if namespace else ""
    started = time.monotonic()
    with Bar(f"re-wrapping DataKeys of {ring}{where} under v{version}") as bar:
        while True:
            mine = [d for d in await kube.list(DATAKEYS, namespace) if datakey_keyring(d) == ring]
            pending = [
                d for d in mine if int((d.get("status") or {}).get("keyRingVersion") or 0) < version
            ]
            bar.update(len(mine) - len(pending), len(mine))
            if not pending:
                break
            if time.monotonic() >= deadline:
                names = ", ".join(
                    f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in pending[:5]
                )
                more = f" and {len(pending) - 5} more" if len(pending) > 5 else ""
                raise UserError(
                    f"timed out: {len(mine) - len(pending)} of {len(mine)} DataKeys re-wrapped "
                    f"under {ring} v{version}; still waiting for {names}{more} "
                    f"(kustody status {ring} shows why)"
                )
            await asyncio.sleep(_POLL)
    print(
        f"{len(mine)} DataKey(s) of {ring}{where} wrapped under v{version} "
        f"({time.monotonic() - started:.1f}s)"
    )
    return 0


def _rotate(args: argparse.Namespace) -> int:
    namespace, _ = target.namespace_scope(args)

    async def body(kube: Kube) -> int:
        stamp = _now_stamp()
        deadline = time.monotonic() + args.timeout
        await _annotate(kube, args.keyring, ROTATE_ANNOTATION, stamp, "rotation")
        print(
            f"rotation of KeyRing {args.keyring} requested ({ROTATE_ANNOTATION}={stamp})",
            flush=True,  # before the progress on stderr, when both go to one pipe
        )
        if not args.wait:
            return 0
        while True:
            kr = await _keyring(kube, args.keyring)
            status = kr.get("status") or {}
            if status.get("lastRotationRequest") == stamp:
                break
            if time.monotonic() >= deadline:
                raise UserError(
                    f"timed out: the operator has not rotated {args.keyring} yet "
                    f"(is it running? kustody doctor checks)"
                )
            await asyncio.sleep(_POLL)
        primary = int(status["primaryVersion"])
        print(f"KeyRing {args.keyring}: v{primary} is primary", flush=True)
        if await _rewrap_policy(kube, kr) == "Manual":
            print(
                f"its RotationPolicy says rewrap: Manual, so DataKeys stay on their version "
                f"until `kustody rewrap {args.keyring}`"
            )
            return 0
        return await _wait_rewrapped(kube, args.keyring, primary, namespace, deadline)

    return target.run_with_kube(args, body)


def _rewrap(args: argparse.Namespace) -> int:
    namespace, _ = target.namespace_scope(args)

    async def body(kube: Kube) -> int:
        from kustody.kube.errors import NotFound

        try:
            kr = await _keyring(kube, args.keyring)
        except NotFound:
            raise UserError(f"KeyRing {args.keyring} does not exist") from None
        primary = (kr.get("status") or {}).get("primaryVersion")
        if not primary:
            raise UserError(f"KeyRing {args.keyring} has no primary version yet")
        stamp = _now_stamp()
        await _annotate(kube, args.keyring, REWRAP_ANNOTATION, stamp, "a re-wrap")
        print(
            f"re-wrap of KeyRing {args.keyring}'s DataKeys under its primary version v{primary} "
            f"requested ({REWRAP_ANNOTATION}={stamp})",
            flush=True,
        )
        if args.no_wait:
            return 0
        deadline = time.monotonic() + args.timeout
        return await _wait_rewrapped(kube, args.keyring, int(primary), namespace, deadline)

    return target.run_with_kube(args, body)


def _restore(args: argparse.Namespace) -> int:
    versions = ",".join(str(v) for v in sorted(set(args.versions)))

    async def body(kube: Kube) -> int:
        await _annotate(
            kube, args.keyring, RESTORE_ANNOTATION, f"{versions}@{_now_stamp()}", "a restore"
        )
        print(f"restore of {args.keyring} version(s) {versions} requested")
        return 0

    return target.run_with_kube(args, body)


def _timeout(p: argparse.ArgumentParser, default: float) -> None:
    p.add_argument(
        "--timeout",
        type=float,
        default=default,
        metavar="SECONDS",
        help="give up waiting after this long, exit 1 (default: %(default)ss)",
    )


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    rotate = sub.add_parser(
        "rotate",
        help="request a rotation of a KeyRing now",
        description="Ask the operator to make a new KEK version primary now. With --wait, "
        "follow the KeyRing's DataKeys until each is re-wrapped under it.",
    )
    rotate.add_argument("keyring", help="the KeyRing to rotate")
    rotate.add_argument(
        "--wait",
        action="store_true",
        help="wait for the new version, then show DataKeys re-wrapped (progress on stderr)",
    )
    _timeout(rotate, 300)
    target.add_cluster_flags(rotate)
    rotate.set_defaults(func=_rotate)

    rewrap = sub.add_parser(
        "rewrap",
        help="re-wrap a KeyRing's DataKeys under its primary version now",
        description="Re-wrap a KeyRing's DataKeys under its primary version now (for rewrap: "
        "Manual policies, or outside the maintenance window), and show them move (progress on "
        "stderr) until all have or --timeout passes.",
    )
    rewrap.add_argument("keyring", help="the KeyRing")
    rewrap.add_argument("--no-wait", action="store_true", help="only send the request")
    _timeout(rewrap, 300)
    target.add_cluster_flags(rewrap)
    rewrap.set_defaults(func=_rewrap)

    restore = sub.add_parser(
        "restore",
        help="bring KeyRing versions back to Enabled (cancels a scheduled destruction)",
        description="Bring KeyRing versions back to Enabled; cancels a scheduled destruction.",
    )
    restore.add_argument("keyring", help="the KeyRing")
    restore.add_argument("versions", type=int, nargs="+", help="version numbers to restore")
    target.add_cluster_flags(restore, namespaces=False)
    restore.set_defaults(func=_restore)
