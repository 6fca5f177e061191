"""Errors every layer may raise; the CLI prints them as one line without a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A failure the user can fix: the message says what went wrong and what to do."""
