"""``kustody datakey generations|regenerate|keep|unkeep``: a DataKey's DEK generations.

``generations`` lists the keyset (key id, state, KeyRing version, when a staged removal
happens). ``regenerate`` asks for new key material now (the earlier generations stay,
decrypt-only). ``keep`` cancels a scheduled removal of generations (they stay in the keyset
until ``unkeep``); all three only set annotations the operator acts on.
"""

from __future__ import annotations

import argparse
import datetime as dt
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from kustody.cli import output, target
from kustody.domain.keyset import KEEP_ANNOTATION, REGENERATE_ANNOTATION, parse_keep
from kustody.domain.timestamps import format_micro_time
from kustody.errors import UserError

if TYPE_CHECKING:
    from kustody.kube.api import Kube

REPORT_API = "kustody.io/cli/v1"


def _ref(text: str, default_namespace: str | None) -> tuple[str, str]:
    """``NAMESPACE/NAME`` or ``NAME`` with -n."""
    namespace, _, name = text.rpartition("/")
    namespace = namespace or (default_namespace or "")
    if not namespace or not name:
        raise UserError(f"{text!r}: give NAMESPACE/NAME, or NAME with -n NAMESPACE")
    return namespace, name


async def _get(kube: Kube, namespace: str, name: str) -> dict[str, Any]:
    from kustody.kube.errors import KubeError, NotFound
    from kustody.kube.resources import DATAKEYS

    try:
        return await kube.get(DATAKEYS, name, namespace)
    except NotFound:
        raise UserError(f"DataKey {namespace}/{name} does not exist") from None
    except KubeError as exc:
        raise UserError(f"could not read DataKey {namespace}/{name}: {exc}") from None


async def _annotate(kube: Kube, namespace: str, name: str, value: Mapping[str, str | None]) -> None:
    from kustody.kube.errors import KubeError
    from kustody.kube.resources import DATAKEYS

    try:
        await kube.patch(DATAKEYS, name, {"metadata": {"annotations": dict(value)}}, namespace)
    except KubeError as exc:
        raise UserError(f"could not annotate DataKey {namespace}/{name}: {exc}") from None


def generations_report(datakey: Mapping[str, Any]) -> dict[str, Any]:
    """The ``GenerationsReport`` of one DataKey (kustody.io/cli/v1)."""
    meta, status = datakey.get("metadata") or {}, datakey.get("status") or {}
    return {
        "apiVersion": REPORT_API,
        "kind": "GenerationsReport",
        "dataKey": {"namespace": meta.get("namespace"), "name": meta.get("name")},
        "kept": sorted(parse_keep((meta.get("annotations") or {}).get(KEEP_ANNOTATION))),
        "generations": [
            {
                "generation": g.get("generation"),
                "keyId": f"{int(g.get('keyId') or 0):08x}",
                "state": g.get("state"),
                "keyRingVersion": g.get("keyRingVersion"),
                "createdAt": g.get("createdAt"),
                "supersededAt": g.get("supersededAt"),
                "removeAt": g.get("removeAt"),
            }
            for g in status.get("generations") or ()
        ],
    }


def _table(report: Mapping[str, Any], wide: bool) -> str:
    head = ["GENERATION", "KEY ID", "STATE", "VERSION", "REMOVE AT"]
    if wide:
        head += ["CREATED", "SUPERSEDED"]
    rows = [head]
    for g in report["generations"]:
        row = [str(g["generation"]), g["keyId"], str(g["state"]), f"v{g['keyRingVersion']}",
               g["removeAt"] or "-"]  # fmt: skip
        if wide:
            row += [g["createdAt"] or "-", g["supersededAt"] or "-"]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)  # fmt: skip


def _generations(args: argparse.Namespace) -> int:
    namespace, name = _ref(args.datakey, args.namespace)

    async def body(kube: Kube) -> int:
        report = generations_report(await _get(kube, namespace, name))
        print(output.render(report, args.output, lambda wide: _table(report, wide)))
        return 0

    return target.run_with_kube(args, body)


def _regenerate(args: argparse.Namespace) -> int:
    namespace, name = _ref(args.datakey, args.namespace)
    stamp = format_micro_time(dt.datetime.now(dt.UTC))

    async def body(kube: Kube) -> int:
        await _get(kube, namespace, name)
        await _annotate(kube, namespace, name, {REGENERATE_ANNOTATION: stamp})
        print(
            f"regeneration of DataKey {namespace}/{name} requested ({REGENERATE_ANNOTATION}="
            f"{stamp}); earlier generations stay in the keyset, decrypt-only"
        )
        return 0

    return target.run_with_kube(args, body)


def _change_keep(args: argparse.Namespace, add: bool) -> int:
    namespace, name = _ref(args.datakey, args.namespace)

    async def body(kube: Kube) -> int:
        datakey = await _get(kube, namespace, name)
        annotations = (datakey.get("metadata") or {}).get("annotations") or {}
        kept = set(parse_keep(annotations.get(KEEP_ANNOTATION)))
        kept = kept | set(args.generations) if add else kept - set(args.generations)
        value = ",".join(str(g) for g in sorted(kept)) or None
        await _annotate(kube, namespace, name, {KEEP_ANNOTATION: value})
        what = "kept (a scheduled removal is cancelled)" if add else "no longer kept"
        listed = ", ".join(str(g) for g in sorted(set(args.generations)))
        print(f"DataKey {namespace}/{name}: generation(s) {listed} {what}")
        return 0

    return target.run_with_kube(args, body)


def _datakey_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("datakey", metavar="NAMESPACE/NAME", help="the DataKey (or NAME with -n)")
    target.add_cluster_flags(p, namespaces=False)
    p.add_argument("-n", "--namespace", help="the DataKey's namespace, if not in the name")


def _generation_numbers(p: argparse.ArgumentParser) -> None:
    p.add_argument("generations", type=int, nargs="+", metavar="GENERATION")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    group = sub.add_parser(
        "datakey",
        help="a DataKey's DEK generations: list, regenerate, keep",
        description="A DataKey's DEK generations: list them, make a new one now, or keep "
        "earlier ones from a scheduled removal.",
    )
    actions = group.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = actions.add_parser(
        "generations",
        help="list the generations in a DataKey's keyset",
        description="List the generations in a DataKey's keyset: key id, state (Primary, "
        "DecryptOnly, RemovalScheduled), KeyRing version and when a removal happens.",
    )
    _datakey_arg(listing)
    output.add_output_flag(listing)
    listing.set_defaults(func=_generations)

    regen = actions.add_parser(
        "regenerate",
        help="new key material now (earlier generations stay, decrypt-only)",
        description="Ask the operator for new key material now: a new generation becomes "
        "the primary; earlier generations stay in the keyset, decrypt-only.",
    )
    _datakey_arg(regen)
    regen.set_defaults(func=_regenerate)

    keep = actions.add_parser(
        "keep",
        help="keep generations (cancels their scheduled removal)",
        description="Keep generations in the keyset: cancels a scheduled removal; they stay "
        "until unkeep.",
    )
    _datakey_arg(keep)
    _generation_numbers(keep)
    keep.set_defaults(func=lambda a: _change_keep(a, True))

    unkeep = actions.add_parser(
        "unkeep",
        help="stop keeping generations (spec.retention applies again)",
        description="Stop keeping generations: spec.retention applies to them again.",
    )
    _datakey_arg(unkeep)
    _generation_numbers(unkeep)
    unkeep.set_defaults(func=lambda a: _change_keep(a, False))


__all__: Sequence[str] = ["generations_report", "register"]
