"""Help text as plain text: paragraphs wrapped to the terminal, examples kept as written."""

from __future__ import annotations

import argparse


class PlainHelp(argparse.HelpFormatter):
    """Wraps a description or epilog that is one paragraph; keeps one with line breaks (an
    example block) exactly as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)
