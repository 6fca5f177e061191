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


# kubectl's completion of plugins (kubectl >= 1.26) runs `kubectl_complete-<plugin> ARGS...`
# with the words typed after the plugin's name, the last one being completed, and reads one
# candidate per line and then `:<directive>` (Cobra's protocol; 4 = no file completion).
_NO_FILE_COMPLETION = 4


def candidates(words: list[str]) -> list[str]:
    """What may follow ``words`` (the last one partly typed) on a kustody command line."""
    from kustody.cli import build_parser

    parser = build_parser()
    *done, partial = words or [""]
    previous: argparse.Action | None = None
    for word in done:
        sub = _subparsers(parser)
        if previous is not None:
            previous = None  # this word was that option's value
        elif word.startswith("-"):
            previous = _option(parser, word)
            if previous is not None and previous.nargs == 0:
                previous = None
        elif sub is not None and word in sub.choices:
            parser = sub.choices[word]
    if previous is not None:
        return [str(c) for c in previous.choices or () if str(c).startswith(partial)]
    if partial.startswith("-"):
        flags = [s for a in parser._actions for s in a.option_strings if s.startswith("--")]
        return sorted(f for f in flags if f.startswith(partial))
    sub = _subparsers(parser)
    if sub is not None:
        return sorted(c for c in sub.choices if c.startswith(partial))
    choices = [
        str(c)
        for a in parser._actions
        if not a.option_strings and a.choices is not None
        for c in a.choices
    ]
    return [c for c in choices if c.startswith(partial)]


def _subparsers(
    parser: argparse.ArgumentParser,
) -> argparse._SubParsersAction[argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return None


def _option(parser: argparse.ArgumentParser, word: str) -> argparse.Action | None:
    return parser._option_string_actions.get(word.split("=", 1)[0])


def kubectl_complete() -> int:
    """Entry point of ``kubectl_complete-kustody``."""
    import sys

    for candidate in candidates(sys.argv[1:]):
        print(candidate)
    print(f":{_NO_FILE_COMPLETION}")
    return 0
