"""``kustody unwrap`` (also ``python -m kustody.client``): for an init container.

Writes the plaintext DEK to a file on a memory-backed filesystem (an ``emptyDir`` with
``medium: Memory``), atomically and with mode 0400. Never to disk unless ``--allow-disk``,
never to stdout unless ``--stdout``; errors name a reason, never the key or the token.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kustody.client.errors import UnwrapError
from kustody.client.memoryfs import is_memory_backed
from kustody.client.secretdir import ENCRYPTION_CONTEXT, WRAPPED_KEY
from kustody.client.unwrapper import (
    CA_FILE_ENV,
    ENDPOINT_ENV,
    SERVER_NAME_ENV,
    TOKEN_FILE_ENV,
    UnwrapClient,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--secret-dir", required=True, type=Path, help="the mounted DataKey Secret")
    parser.add_argument("--out", type=Path, help="write the DEK here (a memory-backed directory)")
    parser.add_argument("--stdout", action="store_true", help="write the DEK to stdout")
    parser.add_argument(
        "--allow-disk",
        action="store_true",
        help="allow --out on a disk-backed filesystem (the DEK then persists on that disk)",
    )
    parser.add_argument(
        "--encoding", choices=["raw", "base64", "hex"], default="raw", help="default: raw bytes"
    )
    parser.add_argument("--endpoint", help=f"host:port of the sidecar (${ENDPOINT_ENV})")
    parser.add_argument("--ca-file", help=f"CA of the sidecar's certificate (${CA_FILE_ENV})")
    parser.add_argument("--token-file", help=f"projected ServiceAccount token (${TOKEN_FILE_ENV})")
    parser.add_argument("--server-name", help=f"TLS name to verify (${SERVER_NAME_ENV})")
    parser.add_argument("--wrapped-key-name", default=WRAPPED_KEY, help="default: %(default)s")
    parser.add_argument(
        "--encryption-context-name", default=ENCRYPTION_CONTEXT, help="default: %(default)s"
    )
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    parser.add_argument("--attempts", type=int, default=8, help="calls before giving up")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "unwrap",
        help="unwrap a DataKey Secret's DEK into a memory-backed file (init containers)",
        description=__doc__.splitlines()[0] if __doc__ else None,
        allow_abbrev=False,
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def _encode(dek: bytes, encoding: str) -> bytes:
    if encoding == "base64":
        return base64.b64encode(dek) + b"\n"
    if encoding == "hex":
        return dek.hex().encode() + b"\n"
    return dek


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), mode 0400."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _fail(message: str) -> int:
    print(f"kustody unwrap: error: {message}", file=sys.stderr)
    return 1


def run(args: argparse.Namespace) -> int:
    if args.out is None and not args.stdout:
        return _fail("nothing to do: give --out FILE and/or --stdout")
    if args.out is not None:
        directory = args.out.resolve().parent
        if not directory.is_dir():
            return _fail(f"{directory} is not a directory")
        if not args.allow_disk and not is_memory_backed(directory):
            return _fail(
                f"{directory} is not memory-backed (tmpfs); mount an emptyDir with "
                "medium: Memory there, or pass --allow-disk to write the key to disk"
            )
    client = UnwrapClient(
        args.endpoint,
        ca_file=args.ca_file,
        token_file=args.token_file,
        server_name=args.server_name,
        timeout=args.timeout,
        attempts=args.attempts,
        cache_ttl=0,
    )
    try:
        dek = client.unwrap(
            args.secret_dir,
            wrapped_key=args.wrapped_key_name,
            encryption_context=args.encryption_context_name,
        )
    except UnwrapError as exc:
        return _fail(str(exc))
    finally:
        client.close()
    data = _encode(dek, args.encoding)
    if args.out is not None:
        try:
            write_private(args.out, data)
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
        print(f"kustody unwrap: wrote {len(dek)}-byte key to {args.out}", file=sys.stderr)
    if args.stdout:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kustody.client", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
