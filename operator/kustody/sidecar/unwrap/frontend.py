"""An extra workload front end: the unwrap service alone, in a process of its own.

``python -m kustody.sidecar.unwrap.frontend --fd N --parent PID --slot K``, started by the
first front end (:class:`kustody.sidecar.unwrap.frontends.FrontEnds`), which writes the
service's settings (:func:`kustody.sidecar.unwrap.frontends.settings_document`: paths and
numbers, nothing secret) to its standard input. It listens on the same TLS port as the
first front end (``SO_REUSEPORT``: the kernel spreads new connections over the processes),
authenticates and authorises each call itself (its own TokenReview and DataKey caches, rate
limits and audit log) and decrypts through its relay (``--fd``,
:class:`kustody.sidecar.relay.RelayLink`): it never loads PKCS#11 and cannot reach the token
for anything but a decrypt.

It stops when its relay closes (the first front end stopped it, or is gone) and dies with
its parent (``PR_SET_PDEATHSIG``); like the PKCS#11 worker it is not dumpable, since it
holds plaintext keys on their way to a workload.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import socket
import sys
from typing import Any

from prometheus_client import CollectorRegistry

from kustody.api.process import die_with_parent, harden
from kustody.kube.api import Kube, load_api_client
from kustody.sidecar.keyservice import KeyService
from kustody.sidecar.relay import READY, RelayLink
from kustody.sidecar.server import settle_heap
from kustody.sidecar.unwrap import audit
from kustody.sidecar.unwrap.frontends import config_from_document
from kustody.sidecar.unwrap.metrics import snapshot
from kustody.sidecar.unwrap.server import WorkloadServer

log = logging.getLogger(__name__)

# Decrypt batches on the relay at once: the way to the worker is twice as long as the first
# front end's, so a second batch is sent while the first is away.
RELAY_DECRYPTS_IN_FLIGHT = 2


async def serve(link: RelayLink, document: dict[str, Any], kube: Kube) -> None:
    config = config_from_document(document)
    registry = CollectorRegistry()
    keys = KeyService(link, decrypts_in_flight=RELAY_DECRYPTS_IN_FLIGHT)
    server = WorkloadServer(config, keys, registry, kube, reuse_port=True)
    link.open()
    link.on_metrics = lambda: snapshot(registry)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, link.closed.set)
    await server.start()
    settle_heap()
    link.notify(READY, ())
    try:
        await link.closed.wait()
    finally:
        await server.stop(grace=1.0)
        link.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kustody.sidecar.unwrap.frontend")
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--slot", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        harden()
    except OSError as exc:
        print(f"kustody workload front end: cannot disable core dumps: {exc}", file=sys.stderr)
        return 3
    die_with_parent(args.parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the first front end decides when we stop
    document = json.load(sys.stdin)
    logging.basicConfig(
        level=document.get("log_level", "INFO"),
        format=f"%(asctime)s %(levelname)s %(name)s[front end {args.slot}]: %(message)s",
        stream=sys.stderr,
    )
    audit.configure()
    try:
        kube = Kube(load_api_client(document.get("kubeconfig")), workers=8)
    except Exception as exc:  # the kubernetes package raises several unrelated types here
        log.error("cannot load Kubernetes credentials: %s", exc)
        return 2
    link = RelayLink(socket.socket(fileno=args.fd))
    try:
        asyncio.run(serve(link, document, kube))
    except OSError as exc:
        log.error("the workload front end could not start: %s", exc)
        return 1
    finally:
        kube.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
