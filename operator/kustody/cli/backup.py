"""``kustody backup export`` and ``kustody backup restore``: DataKeys' wrapped keysets.

Export reads every DataKey's ``status.generations`` (wrapped DEKs only) into one file
(``kustody.io/backup/v1``, see :mod:`kustody.domain.backup`). Restore, into a rebuilt cluster
*before* the DataKeys are applied from Git, writes each entry as the DataKey's Secret; the
operator then adopts it for the re-created DataKey once the sidecar has verified that every
wrapped key decrypts under that DataKey's binding, and generates no new DEK.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kustody.cli import target
from kustody.domain import backup
from kustody.errors import UserError

if TYPE_CHECKING:
    from kustody.kube.api import Kube


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "backup",
        help="export or restore every DataKey's wrapped keyset (survives a cluster rebuild)",
        description=(
            "Export every DataKey's wrapped keyset to a file, or restore one into a rebuilt "
            "cluster so re-created DataKeys adopt their old DEKs instead of generating new "
            "ones. The file holds only wrapped keys (docs/runbooks/disaster-recovery.md)."
        ),
    )
    verbs = p.add_subparsers(dest="backup_command", required=True, metavar="VERB")
    export = verbs.add_parser(
        "export",
        help="write every DataKey's wrapped keyset to a file",
        description=(
            "Write every DataKey's wrapped keyset (status.generations: key ids, wrapped DEKs, "
            "KeyRing versions) and its spec to one JSON file (kustody.io/backup/v1). "
            "No plaintext key is ever written."
        ),
    )
    export.add_argument("-o", "--output", required=True, help="file to write ('-': stdout)")
    target.add_cluster_flags(export)
    export.set_defaults(func=_export)
    restore = verbs.add_parser(
        "restore",
        help="write a backup's keysets back as DataKey Secrets, for adoption",
        description=(
            "Write each entry of a backup as its DataKey's Secret (creating missing "
            "namespaces), without an owner: the DataKey applied afterwards (or already there "
            "without key material) adopts it after the HSM sidecar verified every wrapped key "
            "decrypts under its binding. Entries whose DataKey already holds other keys, or "
            "whose Secret name is taken by another Secret, are reported and left alone "
            "(exit status 1)."
        ),
    )
    restore.add_argument("file", help="a file written by kustody backup export ('-': stdin)")
    target.add_cluster_flags(restore)
    restore.set_defaults(func=_restore)


def _write(path: str, text: str) -> None:
    if path == "-":
        sys.stdout.write(text)
        return
    out = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent or Path("."))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _export(args: argparse.Namespace) -> int:
    namespace, _ = target.namespace_scope(args)

    async def body(kube: Kube) -> int:
        from kustody.kube.errors import KubeError
        from kustody.kube.resources import DATAKEYS, KEYRINGS

        try:
            datakeys = await kube.list(DATAKEYS, namespace)
            keyrings = await kube.list(KEYRINGS)
        except KubeError as exc:
            raise UserError(f"cannot list DataKeys and KeyRings: {exc}") from None
        document, skipped = backup.build(datakeys, keyrings, dt.datetime.now(dt.UTC))
        _write(args.output, json.dumps(document, indent=1, sort_keys=True) + "\n")
        for line in skipped:
            print(f"skipped {line}", file=sys.stderr)
        count = len(document["dataKeys"])
        generations = sum(len(e["generations"]) for e in document["dataKeys"])
        where = "stdout" if args.output == "-" else args.output
        print(
            f"exported {count} DataKey(s), {generations} generation(s), wrapped only, to {where}",
            file=sys.stderr,
        )
        return 0

    return target.run_with_kube(args, body)


def _read(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None


def _restore(args: argparse.Namespace) -> int:
    text = _read(args.file)
    try:
        entries = backup.parse(text)
        created_at = str(json.loads(text).get("createdAt") or "unknown")
    except backup.BackupError as exc:
        raise UserError(f"{args.file}: {exc}") from None
    namespace, _ = target.namespace_scope(args)
    if namespace:
        entries = [e for e in entries if e.namespace == namespace]

    async def body(kube: Kube) -> int:
        failed = 0
        counts = {"written": 0, "present": 0, "adopted": 0}
        namespaces: set[str] = set()
        for entry in entries:
            if entry.namespace not in namespaces:
                await _ensure_namespace(kube, entry.namespace)
                namespaces.add(entry.namespace)
            outcome = await _restore_one(kube, entry, created_at)
            where = f"{entry.namespace}/{entry.name}"
            if outcome in counts:
                counts[outcome] += 1
            else:
                failed += 1
                print(f"not restored {where}: {outcome}", file=sys.stderr)
        print(
            f"restored {counts['written']} DataKey Secret(s); {counts['present']} already "
            f"present, {counts['adopted']} DataKey(s) already holding these keys, "
            f"{failed} refused",
            file=sys.stderr,
        )
        return 1 if failed else 0

    return target.run_with_kube(args, body)


async def _ensure_namespace(kube: Kube, name: str) -> None:
    from kustody.kube.errors import Conflict, KubeError
    from kustody.kube.resources import NAMESPACES

    if await kube.get_or_none(NAMESPACES, name) is not None:
        return
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    try:
        await kube.create(NAMESPACES, body)
    except Conflict:
        return
    except KubeError as exc:
        raise UserError(f"cannot create namespace {name}: {exc}") from None
    print(f"created namespace {name}", file=sys.stderr)


def _published_key_ids(secret: dict[str, Any], entry: backup.Entry) -> frozenset[int] | None:
    import base64

    from kustody.domain import keyset
    from kustody.domain.specs import DataKeySpec

    raw = (secret.get("data") or {}).get(DataKeySpec.parse(entry.spec).keys.keyset)
    if not raw:
        return None
    try:
        generations = keyset.parse_keyset_document(base64.b64decode(raw), dt.datetime.now(dt.UTC))
    except (ValueError, keyset.KeysetDocumentError):
        return None
    return frozenset(g.key_id for g in generations)


async def _restore_one(kube: Kube, entry: backup.Entry, created_at: str) -> str:
    """``written``, ``present``, ``adopted``, or why the entry was not restored."""
    from kustody.domain import keyset
    from kustody.kube.errors import Conflict, KubeError
    from kustody.kube.resources import DATAKEYS, SECRETS

    dk = await kube.get_or_none(DATAKEYS, entry.name, entry.namespace)
    if dk is not None:
        held = {g.key_id for g in keyset.from_status(dk.get("status") or {}, dk["metadata"]["uid"])}
        if held and entry.key_ids <= held:
            return "adopted"
        if held:
            return (
                "the DataKey already holds other keys (it generated new ones before the "
                "restore: restore before applying DataKeys)"
            )
    existing = await kube.get_or_none(SECRETS, entry.secret_name, entry.namespace)
    if existing is not None:
        if _published_key_ids(existing, entry) == entry.key_ids:
            return "present"
        return f"Secret {entry.secret_name} exists and holds other keys; left alone"
    try:
        await kube.create(SECRETS, backup.secret_for(entry, created_at), entry.namespace)
    except Conflict:
        return f"Secret {entry.secret_name} was created meanwhile; left alone"
    except KubeError as exc:
        return f"Secret {entry.secret_name} could not be written: {exc}"
    return "written"
