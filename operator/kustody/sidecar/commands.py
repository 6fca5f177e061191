"""``kustody hsm``: run the HSM sidecar. (``kustody hsm probe`` loads PKCS#11 itself, so it is in
:mod:`kustody.pkcs11.probe`.)"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
from pathlib import Path

from kustody.api.pin import PIN_FILE_ENV, pin_file_from
from kustody.api.token import TokenConfig, add_token_arguments
from kustody.domain.duration import parse_duration
from kustody.domain.errors import InvalidArgument
from kustody.errors import UserError
from kustody.sidecar.access import ClientRoles
from kustody.sidecar.server import Sidecar, SidecarConfig, TlsConfig, settle_heap

DEFAULT_SOCKET = "/run/kustody/hsm.sock"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    env = os.environ.get
    parser = sub.add_parser(
        "hsm",
        help="run the HSM sidecar (key service, KMS v2 plugin, metrics)",
        description=(
            "Own one PKCS#11 token and serve keys over gRPC. The PIN is read from a file "
            f"(--pin-file or ${PIN_FILE_ENV}), never from the command line."
        ),
        allow_abbrev=False,
    )
    token = parser.add_argument_group("token")
    add_token_arguments(token)
    serve = parser.add_argument_group("key service")
    serve.add_argument(
        "--socket",
        default=env("KUSTODY_HSM_SOCKET", DEFAULT_SOCKET),
        help="unix socket for the key service ('' to disable; default: %(default)s)",
    )
    serve.add_argument("--listen", metavar="HOST:PORT", help="also serve over TCP with mTLS")
    serve.add_argument("--tls-cert", type=Path, help="server certificate (PEM) for --listen")
    serve.add_argument("--tls-key", type=Path, help="server private key (PEM) for --listen")
    serve.add_argument(
        "--tls-client-ca", type=Path, help="CA (PEM) that client certificates must chain to"
    )
    serve.add_argument(
        "--client-roles",
        type=Path,
        metavar="FILE",
        help=(
            "allow-list for --listen (required with it): YAML/JSON mapping client certificate "
            "identities ('URI:<uri>' or 'DNS:<name>' from the subjectAltName) to a role: "
            "operator, kms or read-only. Unlisted identities are refused"
        ),
    )
    kms = parser.add_argument_group("Kubernetes KMS v2 plugin")
    kms.add_argument("--kms-socket", type=Path, help="unix socket for v2.KeyManagementService")
    kms.add_argument("--kms-keyring", help="KeyRing whose KEK seals kube-apiserver's seeds")
    kms.add_argument(
        "--kms-version", type=int, help="pin the KEK version (default: the primary version)"
    )
    kms.add_argument(
        "--kms-create-if-missing",
        action="store_true",
        help="create version 1 of --kms-keyring if the KeyRing has no version yet",
    )
    ops = parser.add_argument_group("operations")
    ops.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    ops.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address the /metrics port listens on (default: %(default)s)",
    )
    ops.add_argument(
        "--health-interval",
        type=float,
        default=5.0,
        help="seconds between token probes (default: %(default)s)",
    )
    ops.add_argument(
        "--min-destroy-delay",
        default="24h",
        metavar="DURATION",
        help=(
            "how long a version must be DESTROY_SCHEDULED before DestroyVersion is accepted "
            "(e.g. 24h, 720h; lower only for tests; default: %(default)s)"
        ),
    )
    ops.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="least severe log level written (default: %(default)s)",
    )
    parser.set_defaults(func=run)
    parser.add_subparsers(dest="hsm_command", metavar="{probe}")  # probe: kustody.pkcs11.probe


def config_from(args: argparse.Namespace) -> SidecarConfig:
    tls_parts = (args.tls_cert, args.tls_key, args.tls_client_ca)
    if args.listen and not all(tls_parts):
        raise UserError("--listen needs --tls-cert, --tls-key and --tls-client-ca (mTLS only)")
    if args.listen and not args.client_roles:
        raise UserError(
            "--listen needs --client-roles FILE: the allow-list of client certificate "
            "identities (URI:... or DNS:...) and their roles (operator, kms, read-only); "
            "without it no remote caller could be authorised"
        )
    client_roles = None
    if args.listen:
        try:
            client_roles = ClientRoles.load(args.client_roles)
        except ValueError as exc:
            raise UserError(str(exc)) from None
    try:
        min_destroy_delay = parse_duration(args.min_destroy_delay).total_seconds()
    except InvalidArgument as exc:
        raise UserError(f"--min-destroy-delay: {exc}") from None
    if args.kms_socket and not args.kms_keyring:
        raise UserError("--kms-socket needs --kms-keyring")
    if not (args.socket or args.listen or args.kms_socket):
        raise UserError("nothing to serve: give --socket, --listen or --kms-socket")
    pin_file = pin_file_from(args.pin_file)
    if pin_file is None:
        raise UserError(f"no PIN file: pass --pin-file PATH or set ${PIN_FILE_ENV}")
    tls = TlsConfig(*tls_parts) if args.listen else None
    return SidecarConfig(
        token=TokenConfig(Path(args.module), args.token_label, pin_file, gcm_iv=args.gcm_iv),
        socket=Path(args.socket) if args.socket else None,
        listen=args.listen,
        tls=tls,
        client_roles=client_roles,
        min_destroy_delay=min_destroy_delay,
        kms_socket=args.kms_socket,
        kms_key_ring=args.kms_keyring,
        kms_version=args.kms_version,
        kms_create_if_missing=args.kms_create_if_missing,
        metrics_port=args.metrics_port,
        metrics_address=args.metrics_address,
        health_interval=args.health_interval,
    )


def run(args: argparse.Namespace) -> int:
    config = config_from(args)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        sidecar = Sidecar(config)
        try:
            await sidecar.start()
            settle_heap()
            await stop.wait()
        except OSError as exc:
            raise UserError(f"the HSM sidecar could not start: {exc}") from None
        finally:
            await sidecar.stop()

    asyncio.run(main())
    return 0
