"""``kustody operator``, ``kustody rotate`` and ``kustody status``."""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from kustody.domain.specs import RESTORE_ANNOTATION, REWRAP_ANNOTATION, ROTATE_ANNOTATION
from kustody.domain.timestamps import format_micro_time, parse_time
from kustody.errors import UserError
from kustody.handlers.operator import OperatorConfig, RemoteHsm, run
from kustody.handlers.runtime import datakey_keyring
from kustody.kube.api import Kube, load_api_client
from kustody.kube.errors import KubeError, NotFound
from kustody.kube.resources import DATAKEYS, KEYRINGS


def _operator(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("kopf").setLevel(logging.WARNING)
    # "OS signals are ignored: running not in the main thread": by design (see below).
    logging.getLogger("kopf._core.reactor.running").setLevel(logging.ERROR)
    remote = None
    if args.hsm_endpoint:
        missing = [f for f in ("hsm_tls_cert", "hsm_tls_key", "hsm_tls_ca") if not getattr(args, f)]
        if missing:
            flags = ", ".join("--" + f.replace("_", "-") for f in missing)
            raise UserError(f"--hsm-endpoint needs mutual TLS: also give {flags}")
        unreadable = [
            str(p)
            for p in (args.hsm_tls_cert, args.hsm_tls_key, args.hsm_tls_ca)
            if not p.is_file()
        ]
        if unreadable:
            raise UserError(f"TLS file(s) not found: {', '.join(unreadable)}")
        remote = RemoteHsm(
            args.hsm_endpoint, args.hsm_tls_cert, args.hsm_tls_key, args.hsm_tls_ca,
            args.hsm_server_name,
        )  # fmt: skip
    config = OperatorConfig(
        remote=remote,
        hsm_socket=args.hsm_socket,
        kubeconfig=args.kubeconfig,
        namespace=args.namespace,
        lease_name=args.lease_name,
        identity=args.identity or "",
        leader_election=not args.no_leader_election,
        metrics_port=args.metrics_port,
        workers=args.workers,
        resync_seconds=args.resync,
    )

    return _run_with_signals(config)


def _run_with_signals(config: OperatorConfig) -> int:
    """Run the operator's event loop in a worker thread; signals stay with the main thread.

    Kopf replaces SIGINT/SIGTERM handlers when it runs in the main thread and then exits
    on its own; owning the signals here makes a SIGTERM a clean, ordered stop (exit 0)
    that releases the Lease, instead of an unexplained "kopf exited".
    """
    started = threading.Event()
    box: dict[str, Any] = {}

    def worker() -> None:
        async def main() -> int:
            box["loop"], box["stop"] = asyncio.get_running_loop(), asyncio.Event()
            started.set()
            return await run(config, box["stop"])

        try:
            box["rc"] = asyncio.run(main())
        except BaseException as exc:  # re-raised in the main thread
            box["error"] = exc
        finally:
            started.set()

    def on_signal(_sig: int, _frame: object) -> None:
        if "loop" in box:
            box["loop"].call_soon_threadsafe(box["stop"].set)

    thread = threading.Thread(target=worker, name="operator-loop", daemon=True)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    thread.start()
    started.wait()
    while thread.is_alive():
        thread.join(0.5)
    if "error" in box:
        raise box["error"]
    return int(box.get("rc", 1))


def _kube(args: argparse.Namespace) -> Kube:
    try:
        return Kube(load_api_client(args.kubeconfig), workers=4)
    except Exception as exc:  # the kubernetes package raises several unrelated types here
        raise UserError(f"cannot load Kubernetes credentials: {exc}") from None


def _now_stamp() -> str:
    return format_micro_time(dt.datetime.now(dt.UTC))


def _annotate_keyring(args: argparse.Namespace, key: str, value: str, what: str) -> None:
    """Set one annotation on a KeyRing: how the CLI asks the operator for an action."""
    kube = _kube(args)

    async def annotate() -> None:
        await kube.patch(KEYRINGS, args.keyring, {"metadata": {"annotations": {key: value}}})

    try:
        asyncio.run(annotate())
    except NotFound:
        raise UserError(f"KeyRing {args.keyring} does not exist") from None
    except KubeError as exc:
        raise UserError(f"could not request {what} of {args.keyring}: {exc}") from None
    finally:
        kube.close()


def _rotate(args: argparse.Namespace) -> int:
    stamp = _now_stamp()
    _annotate_keyring(args, ROTATE_ANNOTATION, stamp, "rotation")
    print(f"rotation of KeyRing {args.keyring} requested ({ROTATE_ANNOTATION}={stamp})")
    return 0


def _rewrap(args: argparse.Namespace) -> int:
    stamp = _now_stamp()
    _annotate_keyring(args, REWRAP_ANNOTATION, stamp, "a re-wrap")
    print(
        f"re-wrap of KeyRing {args.keyring}'s DataKeys under its primary version requested "
        f"({REWRAP_ANNOTATION}={stamp})"
    )
    return 0


def _restore(args: argparse.Namespace) -> int:
    versions = ",".join(str(v) for v in sorted(set(args.versions)))
    _annotate_keyring(args, RESTORE_ANNOTATION, f"{versions}@{_now_stamp()}", "a restore")
    print(f"restore of {args.keyring} version(s) {versions} requested")
    return 0


def _status(args: argparse.Namespace) -> int:
    kube = _kube(args)

    async def fetch() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        return await kube.list(KEYRINGS), await kube.list(DATAKEYS)

    try:
        keyrings, datakeys = asyncio.run(fetch())
    except KubeError as exc:
        raise UserError(f"could not read KeyRings: {exc}") from None
    finally:
        kube.close()
    print(render_status(keyrings, datakeys, dt.datetime.now(dt.UTC)))
    return 0


def render_status(
    keyrings: list[dict[str, Any]], datakeys: list[dict[str, Any]], now: dt.datetime
) -> str:
    """The text of ``kustody status``: KeyRings, versions, next rotations, destruction impact."""
    lines: list[str] = []
    for kr in sorted(keyrings, key=lambda k: k["metadata"]["name"]):
        name = kr["metadata"]["name"]
        status = kr.get("status") or {}
        ready = _ready(status)
        nxt = parse_time(status.get("nextRotationAt"))
        when = (
            "on request only" if nxt is None else f"{status['nextRotationAt']} ({_ago(nxt, now)})"
        )
        lines.append(
            f"KeyRing {name}: Ready={ready.get('status', 'Unknown')} "
            f"({ready.get('reason', 'Pending')}), primary v{status.get('primaryVersion', '-')}, "
            f"next rotation {when}"
        )
        for v in status.get("versions") or ():
            extra = f", destroy at {v['destroyAt']}" if v.get("destroyAt") else ""
            lines.append(
                f"  v{v['version']:<4} {v.get('state', '?'):<17} "
                f"fingerprint {v.get('fingerprint', '')}  {v.get('dataKeys', 0)} DataKey(s){extra}"
            )
        for impact in status.get("destructionImpact") or ():
            lines.append(
                f"  ! destroying v{impact['version']} would make {impact['dataKeys']} DataKey(s) "
                f"and {impact['secrets']} Secret(s) unreadable"
            )
        mine = [d for d in datakeys if datakey_keyring(d) == name]
        not_ready = [d for d in mine if _ready(d.get("status") or {}).get("status") != "True"]
        lines.append(f"  DataKeys: {len(mine)}, not Ready: {len(not_ready)}")
        for d in not_ready[:10]:
            cond = _ready(d.get("status") or {})
            lines.append(
                f"    {d['metadata']['namespace']}/{d['metadata']['name']}: "
                f"{cond.get('reason', 'Pending')}: {cond.get('message', '')}"
            )
    return "\n".join(lines) if lines else "no KeyRings"


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    conditions = status.get("conditions") or ()
    return next((dict(c) for c in conditions if c.get("type") == "Ready"), {})


def _ago(when: dt.datetime, now: dt.datetime) -> str:
    seconds = int((when - now).total_seconds())
    word = "in" if seconds >= 0 else "overdue by"
    seconds = abs(seconds)
    if seconds >= 86400:
        return f"{word} {seconds // 86400}d"
    if seconds >= 3600:
        return f"{word} {seconds // 3600}h"
    return f"{word} {seconds // 60}m"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def with_kubeconfig(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--kubeconfig",
            default=os.environ.get("KUBECONFIG"),
            help="kubeconfig file (default: $KUBECONFIG, else in-cluster)",
        )
        return p

    op = with_kubeconfig(sub.add_parser("operator", help="run the Kustody operator"))
    op.add_argument(
        "--hsm-socket",
        type=Path,
        default=Path(os.environ.get("KUSTODY_HSM_SOCKET", "/run/kustody/hsm.sock")),
        help="unix socket of the HSM sidecar (default: %(default)s)",
    )
    op.add_argument(
        "--hsm-endpoint",
        help="HOST:PORT of a remote kustody hsm (on-premises key service) over mTLS; "
        "replaces --hsm-socket",
    )
    op.add_argument("--hsm-tls-cert", type=Path, help="client certificate for --hsm-endpoint")
    op.add_argument("--hsm-tls-key", type=Path, help="client key for --hsm-endpoint")
    op.add_argument("--hsm-tls-ca", type=Path, help="CA that signed the remote's certificate")
    op.add_argument("--hsm-server-name", help="expected name in the remote's certificate")
    op.add_argument(
        "--namespace",
        default=os.environ.get("POD_NAMESPACE", "kustody-system"),
        help="namespace of the leader-election Lease (default: %(default)s)",
    )
    op.add_argument("--lease-name", default="kustody-operator", help="leader-election Lease name")
    op.add_argument("--identity", help="leader-election identity (default: hostname-pid)")
    op.add_argument(
        "--no-leader-election", action="store_true", help="act without holding the Lease"
    )
    op.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    op.add_argument("--workers", type=int, default=64, help="concurrent reconciles")
    op.add_argument("--resync", type=float, default=300.0, help="seconds between full passes")
    op.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    op.set_defaults(func=_operator)

    rotate = with_kubeconfig(sub.add_parser("rotate", help="request a rotation of a KeyRing now"))
    rotate.add_argument("keyring", help="the KeyRing to rotate")
    rotate.set_defaults(func=_rotate)

    rewrap = with_kubeconfig(
        sub.add_parser(
            "rewrap",
            help="re-wrap a KeyRing's DataKeys under its primary version now "
            "(for rewrap: Manual policies, or outside the maintenance window)",
        )
    )
    rewrap.add_argument("keyring", help="the KeyRing")
    rewrap.set_defaults(func=_rewrap)

    restore = with_kubeconfig(
        sub.add_parser(
            "restore",
            help="bring KeyRing versions back to Enabled (cancels a scheduled destruction)",
        )
    )
    restore.add_argument("keyring", help="the KeyRing")
    restore.add_argument("versions", type=int, nargs="+", help="version numbers to restore")
    restore.set_defaults(func=_restore)

    status = with_kubeconfig(
        sub.add_parser("status", help="KeyRings, versions, next rotations, destruction impact")
    )
    status.set_defaults(func=_status)
