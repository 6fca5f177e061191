"""``kustody dev``: build, start and stop the local control plane."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kustody.dev import binaries, kmsplugin
from kustody.dev.controlplane import Cluster, ControlPlane


def default_state_dir() -> Path:
    """``$KUSTODY_DEV_DIR``, else ``${XDG_STATE_HOME:-~/.local/state}/kustody/dev``."""
    override = os.environ.get("KUSTODY_DEV_DIR")
    if override:
        return Path(override)
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return base / "kustody" / "dev"


def _build(args: argparse.Namespace) -> int:
    stale = [t.name for t in binaries.TARGETS] if args.force else binaries.stale_targets()
    binaries.build(force=args.force)
    if not stale:
        print("nothing to build: the binaries are cached")
    print(f"binaries ready in {binaries.cache_dir()}")
    print(f"{kmsplugin.NAME} ready: {kmsplugin.build()}")
    return 0


def _up(args: argparse.Namespace) -> int:
    state_dir: Path = args.state_dir
    plane = ControlPlane(state_dir, apiserver_port=args.port, detach=True)
    running = plane.running()
    if running and set(running) == {"etcd", "kube-apiserver", "kube-controller-manager"}:
        cluster = Cluster.load(plane.state_dir)
        print(f"already running at {cluster.server}")
        _print_usage(cluster)
        return 0
    if running:
        print(f"stopping a partly running control plane ({', '.join(sorted(running))})")
        plane.stop()
    started = time.monotonic()
    cluster = plane.start()
    print(f"kustody dev up: ready in {time.monotonic() - started:.1f}s")
    _print_usage(cluster)
    return 0


def _print_usage(cluster: Cluster) -> None:
    from kustody.dev.demo import shell_path

    print(
        f"\n  export KUBECONFIG={cluster.kubeconfig}\n"
        f"  export PATH={shell_path(cluster)}:$PATH\n"
        "  kubectl get namespaces\n\n"
        "Stop it with `kustody dev down` (or `make dev-down`)."
    )


def _down(args: argparse.Namespace) -> int:
    stopped = ControlPlane(args.state_dir).stop()
    print(f"stopped: {', '.join(stopped)}" if stopped else "nothing was running")
    return 0


def _status(args: argparse.Namespace) -> int:
    plane = ControlPlane(args.state_dir)
    running = plane.running()
    if not running:
        print(f"not running (state directory {plane.state_dir})")
        return 1
    cluster = Cluster.load(plane.state_dir)
    for name, pid in sorted(running.items()):
        print(f"{name:<24} pid {pid}")
    print(f"server     {cluster.server}\nkubeconfig {cluster.kubeconfig}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from kustody.dev import demo

    return demo.run(args.state_dir, args.examples, hold=not args.no_wait)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dev = sub.add_parser("dev", help="the local control plane (etcd, kube-apiserver, ...)")
    dev_sub = dev.add_subparsers(dest="dev_command", required=True, metavar="ACTION")

    def with_state_dir(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument(
            "--state-dir",
            type=Path,
            default=default_state_dir(),
            help="where certificates, etcd data, logs and pidfiles live (default: %(default)s)",
        )
        return p

    build = dev_sub.add_parser(
        "build", help="build the control-plane binaries and kustody-kms once (cached)"
    )
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.set_defaults(func=_build)

    up = with_state_dir(dev_sub.add_parser("up", help="start the control plane in the background"))
    up.add_argument("--port", type=int, help="kube-apiserver port (default: a free port)")
    up.set_defaults(func=_up)

    with_state_dir(
        dev_sub.add_parser("down", help="stop everything `dev up` started")
    ).set_defaults(func=_down)
    with_state_dir(dev_sub.add_parser("status", help="show what is running")).set_defaults(
        func=_status
    )

    demo = with_state_dir(
        sub.add_parser("demo", help="run Kustody on the local control plane + SoftHSM2")
    )
    demo.add_argument(
        "--examples",
        type=Path,
        default=Path(__file__).resolve().parents[3] / "examples",
        help="manifests to apply (default: %(default)s)",
    )
    demo.add_argument("--no-wait", action="store_true", help="exit once everything is Ready")
    demo.set_defaults(func=_demo)
