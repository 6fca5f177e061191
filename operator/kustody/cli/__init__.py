"""The ``kustody`` command.

Each subcommand's arguments belong to the layer that implements it (``register(subparsers)``);
this module only wires them together and turns typed errors into one-line messages.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kustody import __version__
from kustody.errors import UserError


def _version(_: argparse.Namespace) -> int:
    print(f"kustody {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from kustody.dev import commands as dev_commands

    parser = argparse.ArgumentParser(prog="kustody", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="print the version")
    version.set_defaults(func=_version)
    dev_commands.register(sub)
    _register_optional(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands of layers that may pull heavier dependencies are imported lazily."""
    import importlib

    for module in (
        "kustody.hsm.commands",
        "kustody.unwrap.commands",  # adds the workload service options to `hsm`
        "kustody.handlers.commands",
        "kustody.client.commands",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"kustody: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
