"""``kustody hsm --workload-listen ...``: the workload unwrap service in the sidecar process.

The sidecar owns the PKCS#11 token, so the workload service must run in the same process.
``kustody.hsm`` may not import the Kubernetes layer, so the composition lives here, above
both: ``register`` adds a "workload unwrap service" group of options to the existing ``hsm``
subcommand and wraps its function; without ``--workload-listen`` the sidecar runs unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import signal
from collections.abc import Callable
from pathlib import Path

from kustody.errors import UserError
from kustody.kube.api import Kube, load_api_client
from kustody.sidecar import commands as hsm_commands
from kustody.sidecar.server import Sidecar, settle_heap
from kustody.sidecar.unwrap import audit
from kustody.sidecar.unwrap.frontends import (
    FrontEnds,
    settings_document,
    shared_limits,
    usable_cores,
)
from kustody.sidecar.unwrap.server import WorkloadConfig, WorkloadServer
from kustody.sidecar.unwrap.tokens import ReviewLimits

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.choices.get("hsm")
    if parser is None:  # the hsm layer is not installed
        return
    group = parser.add_argument_group(
        "workload unwrap service",
        "serve kustody.workload.v1.Unwrap over TLS to pods presenting a projected "
        "ServiceAccount token (see docs/unwrap.md)",
    )
    group.add_argument("--workload-listen", metavar="HOST:PORT", help="enable; TLS only")
    group.add_argument("--workload-tls-cert", type=Path, help="serving certificate (PEM)")
    group.add_argument("--workload-tls-key", type=Path, help="serving private key (PEM)")
    group.add_argument(
        "--kubeconfig", help="API server credentials (default: in-cluster, then $KUBECONFIG)"
    )
    group.add_argument(
        "--workload-audience",
        default="kustody",
        help="the audience a workload's ServiceAccount token must carry (default: %(default)s)",
    )
    group.add_argument(
        "--workload-rate",
        type=float,
        default=100.0,
        help="unwraps/s per ServiceAccount (default: %(default)s)",
    )
    group.add_argument(
        "--workload-burst",
        type=float,
        default=200.0,
        help="unwraps a ServiceAccount may make at once above its rate (default: %(default)s)",
    )
    group.add_argument(
        "--workload-review-ttl",
        type=float,
        default=300.0,
        help="cache a TokenReview at most this long (never past the token's exp)",
    )
    group.add_argument(
        "--workload-datakey-ttl",
        type=float,
        default=5.0,
        help="cache DataKeys, KeyRings and Namespace labels this long (revocation delay)",
    )
    defaults = ReviewLimits()
    group.add_argument(
        "--workload-peer-review-rate",
        type=float,
        default=defaults.peer_rate,
        help="new (uncached) tokens/s one client address may have reviewed (default: %(default)s)",
    )
    group.add_argument(
        "--workload-peer-review-burst",
        type=float,
        default=defaults.peer_burst,
        help="new tokens one client address may have reviewed at once (default: %(default)s)",
    )
    group.add_argument(
        "--workload-review-rate",
        type=float,
        default=defaults.rate,
        help="new (uncached) tokens/s reviewed in total (default: %(default)s)",
    )
    group.add_argument(
        "--workload-review-burst",
        type=float,
        default=defaults.burst,
        help="new tokens reviewed at once in total (default: %(default)s)",
    )
    group.add_argument(
        "--workload-reviews-in-flight",
        type=int,
        default=defaults.in_flight,
        help="TokenReviews at once; beyond, refused at once with AUTH_BUSY (default: %(default)s)",
    )
    group.add_argument(
        "--workload-review-cache-size",
        type=int,
        default=10_000,
        help="successful TokenReviews kept (default: %(default)s)",
    )
    group.add_argument(
        "--workload-refusal-cache-size",
        type=int,
        default=4_096,
        help="refusing TokenReviews kept, apart from the successes (default: %(default)s)",
    )
    group.add_argument(
        "--workload-front-ends",
        type=int,
        metavar="N",
        help="processes serving the workload port (SO_REUSEPORT), this one included; the "
        "others decrypt through it (1-64; default: the cores this process may use, its CPU "
        "affinity capped by a cgroup CPU limit)",
    )
    original: Callable[[argparse.Namespace], int] = parser.get_default("func")
    parser.set_defaults(func=lambda args: run(args) if args.workload_listen else original(args))


def config_from(args: argparse.Namespace) -> WorkloadConfig:
    if not (args.workload_tls_cert and args.workload_tls_key):
        raise UserError("--workload-listen needs --workload-tls-cert and --workload-tls-key")
    if args.workload_rate <= 0 or args.workload_burst < 1:
        raise UserError("--workload-rate must be > 0 and --workload-burst >= 1")
    try:
        limits = ReviewLimits(
            peer_rate=args.workload_peer_review_rate,
            peer_burst=args.workload_peer_review_burst,
            rate=args.workload_review_rate,
            burst=args.workload_review_burst,
            in_flight=args.workload_reviews_in_flight,
        )
    except ValueError as exc:
        raise UserError(f"--workload-*review* limits: {exc}") from None
    if min(args.workload_review_cache_size, args.workload_refusal_cache_size) < 1:
        raise UserError("--workload-review-cache-size and --workload-refusal-cache-size >= 1")
    if args.workload_front_ends is not None and not 1 <= args.workload_front_ends <= 64:
        raise UserError("--workload-front-ends must be between 1 and 64")
    return WorkloadConfig(
        listen=args.workload_listen,
        tls_cert=args.workload_tls_cert,
        tls_key=args.workload_tls_key,
        audience=args.workload_audience,
        rate=args.workload_rate,
        burst=args.workload_burst,
        review_ttl=args.workload_review_ttl,
        datakey_ttl=args.workload_datakey_ttl,
        review_limits=shared_limits(limits, front_ends_of(args)),
        review_cache_size=args.workload_review_cache_size,
        refusal_cache_size=args.workload_refusal_cache_size,
    )


def front_ends_of(args: argparse.Namespace) -> int:
    count: int | None = args.workload_front_ends
    return count if count is not None else usable_cores()


def _kube(kubeconfig: str | None) -> Kube:
    try:
        return Kube(load_api_client(kubeconfig), workers=8)
    except Exception as exc:  # the kubernetes package raises several unrelated types here
        raise UserError(f"cannot load Kubernetes credentials: {exc}") from None


def run(args: argparse.Namespace) -> int:
    sidecar_config = hsm_commands.config_from(args)
    workload_config = config_from(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    audit.configure()
    kube = _kube(args.kubeconfig)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sidecar = Sidecar(sidecar_config)
        workload: WorkloadServer | None = None
        front_ends: FrontEnds | None = None
        count = front_ends_of(args)
        try:
            await sidecar.start()
            registry = sidecar.metrics.registry
            if count > 1:
                front_ends = FrontEnds(count, sidecar.connection)
                registry.register(front_ends.metrics)
                registry = front_ends.metrics.own
            workload = WorkloadServer(
                workload_config, sidecar.service, registry, kube, reuse_port=count > 1
            )
            await workload.start()
            if front_ends is not None:
                host = workload_config.listen.rsplit(":", 1)[0]
                bound = dataclasses.replace(workload_config, listen=f"{host}:{workload.port}")
                await front_ends.start(
                    settings_document(bound, kubeconfig=args.kubeconfig, log_level=args.log_level)
                )
            settle_heap()
            await stop.wait()
        except OSError as exc:
            raise UserError(f"the HSM sidecar could not start: {exc}") from None
        finally:
            if front_ends is not None:
                await front_ends.stop()
            if workload is not None:
                await workload.stop()
            await sidecar.stop()

    try:
        asyncio.run(main())
    finally:
        kube.close()
    return 0
