"""The kustody command and the kubectl kustody plugin.

Each subcommand's arguments belong to the layer that implements it (``register(subparsers)``);
this package wires them together, turns typed errors into one-line messages, and holds the
commands an operator of a cluster types: status, rotate, rewrap, restore, doctor, completion.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from kustody import __version__
from kustody.errors import UserError

# Plain text: this is what `kustody --help` prints first.
DESCRIPTION = (
    "Kustody keeps encryption keys in your custody: KeyRings (KEKs in an HSM), DataKeys "
    "(wrapped DEKs in Secrets) and RotationPolicies, run by an operator and an HSM sidecar."
)
EPILOG = (
    "Read commands take -o table|wide|json|yaml; JSON and YAML follow the versioned schema "
    "kustody.io/cli/v1 (docs/cli.md). Installed as kubectl-kustody too: kubectl kustody status."
)


def _version(_: argparse.Namespace) -> int:
    print(f"kustody {__version__}")
    return 0


def build_parser(prog: str = "kustody") -> argparse.ArgumentParser:
    from kustody.cli import actions, backup, completion, datakeys, doctor, escrow, status
    from kustody.dev import commands as dev_commands

    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    version = sub.add_parser("version", help="print the version", description="Print the version.")
    version.set_defaults(func=_version)
    status.register(sub)
    actions.register(sub)
    datakeys.register(sub)
    doctor.register(sub)
    backup.register(sub)
    escrow.register(sub)
    dev_commands.register(sub)
    _register_optional(sub)
    completion.register(sub)
    return parser


def _register_optional(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Subcommands of layers that may pull heavier dependencies are imported lazily."""
    import importlib

    for module in (
        "kustody.sidecar.commands",
        "kustody.pkcs11.probe",  # adds `hsm probe`
        "kustody.sidecar.unwrap.commands",  # adds the workload service options to `hsm`
        "kustody.controller.commands",
        "kustody.client.commands",
    ):
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
            continue
        mod.register(sub)


def main(argv: Sequence[str] | None = None, prog: str = "kustody") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `kustody status -o json | head`
        return 0


def kubectl_main() -> int:
    """Entry point of ``kubectl-kustody``: kubectl runs it as ``kubectl kustody ...``."""
    return main(prog="kubectl kustody")


if __name__ == "__main__":
    sys.exit(main())
