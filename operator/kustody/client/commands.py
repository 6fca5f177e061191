"""kustody unwrap (also python -m kustody.client): unwrap a DataKey for an init container.

Writes the plaintext DEK to a file on a memory-backed filesystem (an ``emptyDir`` with
``medium: Memory``), atomically and with mode 0400, and beside it the DataKey's keyset (every
generation, for ``kustody.client.Keyset``) when the Secret publishes one. Never to disk
unless ``--allow-disk``, never to stdout unless ``--stdout``; errors name a reason, never the
key or the token.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import errno
import os
import stat
import sys
from collections.abc import Sequence
from pathlib import Path

from kustody.client.errors import UnwrapError
from kustody.client.memoryfs import is_memory_backed
from kustody.client.secretdir import ENCRYPTION_CONTEXT, KEYSET, WRAPPED_KEY
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
    parser.add_argument(
        "--keyset-out",
        type=Path,
        help=(
            "write the keyset (every generation's DEK, JSON for kustody.client.Keyset) here; "
            "default: keyset.json beside --out, when the Secret has a keyset entry"
        ),
    )
    parser.add_argument("--keyset-name", default=KEYSET, help="default: %(default)s")
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


def output_path(out: Path) -> Path:
    """Where ``--out`` really writes: its directory with every symlink resolved, joined with
    its last component — which must not itself be a symlink (a rename would replace the link
    in the link's own directory, not write where it points). Raises ``ValueError``."""
    if not out.name or out.name in (".", ".."):
        raise ValueError(f"{out} does not name a file")
    directory = Path(os.path.realpath(out.parent))
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a directory")
    target = directory / out.name
    if target.is_symlink():
        raise ValueError(f"{out} is a symbolic link; give the real path of the file to write")
    return target


def write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + rename), mode 0400.

    Both steps happen relative to one open handle on ``path``'s directory (resolved once, so
    the directory checked is the directory written), and a symlink as the final component is
    refused rather than followed or replaced."""
    directory = os.open(os.path.realpath(path.parent), os.O_RDONLY | os.O_DIRECTORY)
    try:
        _write_in(directory, path.name, data)
    finally:
        os.close(directory)


def _write_in(directory: int, name: str, data: bytes) -> None:
    try:
        if stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, "the file to write is a symbolic link")
    except FileNotFoundError:
        pass
    tmp = f".{name}.{os.getpid()}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(tmp, flags, 0o400, dir_fd=directory)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
        os.replace(tmp, name, src_dir_fd=directory, dst_dir_fd=directory)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=directory)
        raise


def _fail(message: str) -> int:
    print(f"kustody unwrap: error: {message}", file=sys.stderr)
    return 1


def _open_directory(path: Path) -> tuple[int, str]:
    """An open handle on ``path`` (a directory) and the path it really is (from
    ``/proc/self/fd``, so what is checked is what the handle writes into)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return fd, os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return fd, os.path.realpath(path)


def run(args: argparse.Namespace) -> int:
    if args.out is None and not args.stdout:
        return _fail("nothing to do: give --out FILE and/or --stdout")
    if args.keyset_out is not None and (
        args.out is None
        or os.path.realpath(args.keyset_out.parent) != os.path.realpath(args.out.parent)
    ):
        return _fail("--keyset-out must be in the same (memory-backed) directory as --out")
    directory: int | None = None
    try:
        if args.out is not None:
            try:
                args.out = output_path(args.out)
                directory, real = _open_directory(args.out.parent)
            except (ValueError, OSError) as exc:
                return _fail(str(exc) if isinstance(exc, ValueError) else f"--out: {exc}")
            if not args.allow_disk and not is_memory_backed(real):
                return _fail(
                    f"{real} is not memory-backed (tmpfs); mount an emptyDir with "
                    "medium: Memory there, or pass --allow-disk to write the key to disk"
                )
        return _unwrap(args, directory)
    finally:
        if directory is not None:
            os.close(directory)


def _unwrap(args: argparse.Namespace, directory: int | None) -> int:
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
        dek, keyset = client.unwrap_all(
            args.secret_dir,
            keyset=args.keyset_name,
            wrapped_key=args.wrapped_key_name,
            encryption_context=args.encryption_context_name,
        )
    except UnwrapError as exc:
        return _fail(str(exc))
    finally:
        client.close()
    data = _encode(dek, args.encoding)
    if directory is not None:
        try:
            _write_in(directory, args.out.name, data)
        except OSError as exc:
            return _fail(f"cannot write {args.out}: {exc.strerror or exc}")
        print(f"kustody unwrap: wrote {len(dek)}-byte key to {args.out}", file=sys.stderr)
        if keyset is not None:
            name = args.keyset_out.name if args.keyset_out else "keyset.json"
            try:
                _write_in(directory, name, keyset)
            except OSError as exc:
                return _fail(f"cannot write the keyset {name}: {exc.strerror or exc}")
            print(f"kustody unwrap: wrote the keyset to {args.out.parent / name}", file=sys.stderr)
    if args.stdout:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kustody.client", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
