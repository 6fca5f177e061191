"""kustody operator: run the operator process (the commands that ask it for something are in
kustody.cli)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from kustody.controller.operator import OperatorConfig, RemoteHsm, run
from kustody.errors import UserError


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
        metrics_address=args.metrics_address,
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    def with_kubeconfig(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--kubeconfig",
            default=os.environ.get("KUBECONFIG"),
            help="kubeconfig file (default: $KUBECONFIG, else in-cluster)",
        )
        return p

    op = with_kubeconfig(
        sub.add_parser(
            "operator",
            help="run the Kustody operator",
            description="Run the Kustody operator: reconcile KeyRings, DataKeys and "
            "RotationPolicies, talking to the HSM sidecar; one active replica (Lease).",
        )
    )
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
    op.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address /metrics listens on; 0.0.0.0 to be scraped from other pods "
        "(default: %(default)s)",
    )
    op.add_argument("--workers", type=int, default=64, help="concurrent reconciles")
    op.add_argument("--resync", type=float, default=300.0, help="seconds between full passes")
    op.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    op.set_defaults(func=_operator)
