"""``kustody completion bash|zsh``: a shell completion script, generated from the parser.

shtab writes a static script from the argparse parser itself, so every subcommand and flag is
completed and can never drift from the code, and pressing Tab runs no Python (argcomplete
would start the interpreter and import Kustody on every Tab). It has no dependencies.
"""

from __future__ import annotations

import argparse

from kustody.cli.helpformat import PlainHelp

_EPILOG = """\
install:
  bash:  source <(kustody completion bash)          # in ~/.bashrc
  zsh:   kustody completion zsh > "${fpath[1]}/_kustody"   # then: autoload -U compinit; compinit
"""


def _completion(args: argparse.Namespace) -> int:
    import shtab

    from kustody.cli import build_parser

    print(shtab.complete(build_parser(), shell=args.shell), end="")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "completion",
        help="print a bash or zsh completion script",
        description="Print a shell completion script for kustody (every subcommand and flag).",
        epilog=_EPILOG,
        formatter_class=PlainHelp,
    )
    p.add_argument("shell", choices=["bash", "zsh"], help="the shell")
    p.set_defaults(func=_completion)
