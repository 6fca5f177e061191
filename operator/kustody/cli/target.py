"""Which cluster and namespace a command talks to, with kubectl's flags and rules.

``--kubeconfig`` (else ``$KUBECONFIG``, else in-cluster, else ``~/.kube/config``),
``--context``, ``-n/--namespace`` and ``-A/--all-namespaces`` mean what they mean to kubectl,
so ``kubectl kustody ...`` behaves like any other kubectl command.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import tempfile
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from kustody.errors import UserError
from kustody.kube.api import Kube, load_api_client


def add_cluster_flags(p: argparse.ArgumentParser, *, namespaces: bool = True) -> None:
    group = p.add_argument_group("cluster (as in kubectl)")
    group.add_argument(
        "--kubeconfig",
        default=os.environ.get("KUBECONFIG"),
        help="kubeconfig file (default: $KUBECONFIG, else in-cluster, else ~/.kube/config)",
    )
    group.add_argument("--context", help="kubeconfig context to use (default: the current one)")
    if namespaces:
        group.add_argument("-n", "--namespace", help="only this namespace")
        group.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")


def _default_paths() -> str:
    return os.environ.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")


@contextmanager
def _with_context(kubeconfig: str | None, context: str | None) -> Iterator[str | None]:
    """A kubeconfig path list whose current context is ``context``.

    The kubernetes client merges a ``:``-separated list of files, and the last one that sets
    current-context wins, so a last file holding only ``current-context`` selects the context
    without copying any credentials.
    """
    if not context:
        yield kubeconfig
        return
    with tempfile.NamedTemporaryFile("w", prefix="kustody-context-", suffix=".yaml") as fh:
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": context,
                "clusters": [],
                "contexts": [],
                "users": [],
            },
            fh,
        )
        fh.flush()
        yield f"{kubeconfig or _default_paths()}{os.pathsep}{fh.name}"


def connect(args: argparse.Namespace, *, workers: int = 8) -> Kube:
    """A :class:`Kube` for the cluster the flags name; a UserError that says why not."""
    kubeconfig = getattr(args, "kubeconfig", None)
    context = getattr(args, "context", None)
    try:
        with _with_context(kubeconfig, context) as paths:
            return Kube(load_api_client(paths), workers=workers)
    except Exception as exc:  # the kubernetes package raises several unrelated types here
        where = f" (context {context})" if context else ""
        raise UserError(f"cannot load Kubernetes credentials{where}: {exc}") from None


def run_with_kube(
    args: argparse.Namespace, body: Callable[[Kube], Coroutine[Any, Any, int]]
) -> int:
    """Run ``body`` with a client for the cluster the flags name; close it afterwards."""
    kube = connect(args)
    try:
        return asyncio.run(body(kube))
    finally:
        kube.close()


def namespace_scope(args: argparse.Namespace) -> tuple[str | None, bool]:
    """(namespace, all_namespaces) from -n/-A; -A wins, as in kubectl."""
    if getattr(args, "all_namespaces", False):
        return None, True
    return getattr(args, "namespace", None), False
