"""``kustody status [KEYRING] [-n NS | -A] [-o FORMAT]`` and ``kustody schema KIND``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
from typing import Any

from kustody.cli import output, report, target
from kustody.cli.helpformat import PlainHelp
from kustody.errors import UserError

_EPILOG = """\
examples:
  kustody status                     every KeyRing: versions, next rotation, destruction impact
  kustody status payments            one KeyRing and its DataKeys in every namespace
  kustody status -n payments         the DataKeys of one namespace: version, generation,
                                     Secret, consumers, last Event
  kustody status -A -o json          everything, as a StatusReport (kustody.io/cli/v1)
"""


async def _fetch(args: argparse.Namespace, scope: report.Scope) -> dict[str, list[Any]]:
    from kustody.kube.errors import NotFound
    from kustody.kube.resources import DATAKEYS, EVENTS, KEYRINGS

    kube = target.connect(args)
    try:
        keyrings = await kube.list(KEYRINGS)
        if scope.keyring and not any(k["metadata"]["name"] == scope.keyring for k in keyrings):
            raise UserError(f"KeyRing {scope.keyring} does not exist")
        datakeys = await kube.list(DATAKEYS, scope.namespace)
        events: list[Any] = []
        if scope.lists_datakeys:
            with contextlib.suppress(NotFound):
                reply = await kube.request(
                    "GET",
                    EVENTS.path(None, scope.namespace),
                    query={"fieldSelector": "involvedObject.kind=DataKey"},
                    kind="Event",
                )
                events = list(reply.get("items") or ())
        return {"keyrings": keyrings, "datakeys": datakeys, "events": events}
    finally:
        kube.close()


def _status(args: argparse.Namespace) -> int:
    from kustody.kube.errors import KubeError, NotFound

    namespace, all_ns = target.namespace_scope(args)
    scope = report.Scope(args.keyring, namespace, all_ns)
    try:
        found = asyncio.run(_fetch(args, scope))
    except NotFound:
        raise UserError(
            "the kustody.io CRDs are not installed in this cluster "
            "(kubectl apply --server-side -f crds/, or the Helm chart)"
        ) from None
    except KubeError as exc:
        raise UserError(f"could not read KeyRings and DataKeys: {exc}") from None
    now = dt.datetime.now(dt.UTC)
    data = report.build_status(scope, found["keyrings"], found["datakeys"], found["events"], now)
    print(output.render(data, args.output, lambda wide: report.render_status(data, now, wide)))
    return 0


def _schema(args: argparse.Namespace) -> int:
    print(json.dumps(output.schema(args.kind), indent=2))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = sub.add_parser(
        "status",
        help="KeyRings, versions, next rotations; DataKeys of a KeyRing or namespace",
        description="Show KeyRings (versions, next rotation, destruction impact) and, for one "
        "KeyRing or with -n/-A, their DataKeys with version, generation, Secret, consumers and "
        "last Event.",
        epilog=_EPILOG,
        formatter_class=PlainHelp,
    )
    status.add_argument("keyring", nargs="?", help="only this KeyRing (and its DataKeys)")
    target.add_cluster_flags(status)
    output.add_output_flag(status)
    status.set_defaults(func=_status)

    schema = sub.add_parser(
        "schema",
        help="print the JSON Schema of -o json/yaml output",
        description="Print the JSON Schema (draft 2020-12) of a report that -o json or -o yaml "
        "writes, version kustody.io/cli/v1.",
    )
    schema.add_argument(
        "kind",
        choices=["StatusReport", "DoctorReport", "GenerationsReport"],
        help="the report kind",
    )
    schema.set_defaults(func=_schema)
