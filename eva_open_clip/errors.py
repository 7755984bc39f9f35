"""The errors this package raises for what its user can put right, and the exit status of each.

Every such error is a `UserError`, told in one line that names the file, key or argument as the user
spelled it and what to do. The command line turns it into that line and its exit status, in one place
(`cli.main`): 2 for a mistake in the arguments or inputs found before any work, 1 for a failure during
the work. Python callers catch `eva_open_clip.UserError`.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A mistake or failure that its user can act on (the base of every error this package raises)."""

    exit_code = 1


class ToolError(UserError, RuntimeError):
    """A failure while working (a file that cannot be written, a model that cannot be loaded): exit status 1."""


class UsageError(ToolError):
    """A mistake in the command's arguments or inputs, found before any work: exit status 2."""

    exit_code = 2


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`; did you mean 'X'?` for the choice closest to a misspelled `word` (ignoring case), or ''."""
    by_folded = {}
    for choice in choices:
        by_folded.setdefault(choice.casefold(), choice)
    close = difflib.get_close_matches(word.casefold(), list(by_folded), n=2, cutoff=0.6)
    if not close:
        return ''
    return '; did you mean ' + ' or '.join(f"'{by_folded[c]}'" for c in close) + '?'
