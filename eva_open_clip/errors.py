"""The errors this package raises for what its user can put right, and the exit status of each.

Every such error is a `UserError`, told in one line that names the file, key or argument as the user
spelled it and what to do. A parameter is named in a message with `param(name, value)`: Python callers
read it as `name=value` (`str(error)`), users of the command line as its flag, `--name value`
(`error.spelled(COMMAND_LINE)`); a parameter's flag is its name with dashes (`batch_size`:
`--batch-size`). Where the advice itself differs, `say(python=..., command_line=...)` holds both. The
command line turns every `UserError` into its line and exit status in one place (`cli.main`): 2 for a
mistake in the arguments or inputs found before any work, 1 for a failure during the work. Python
callers catch `eva_open_clip.UserError`, or one of its kinds below.
"""
from __future__ import annotations

import difflib
import re
from typing import Iterable

# a named parameter or a two-way text inside a message: OPEN kind SEP first SEP second CLOSE
_OPEN, _SEP, _CLOSE, _NO_VALUE, _ALT = '\ue000', '\ue001', '\ue002', '\ue003', '\ue004'
_MARK = re.compile(f'{_OPEN}(param|say){_SEP}([^{_OPEN}{_CLOSE}]*){_SEP}([^{_OPEN}{_CLOSE}]*){_CLOSE}')
PYTHON, COMMAND_LINE = 'python', 'command_line'


def _plain(value: object) -> str:
    return ''.join(c for c in str(value) if c not in (_OPEN, _SEP, _CLOSE, _NO_VALUE, _ALT))


def param(name: str, value: object = _NO_VALUE, flag: str | None = None) -> str:
    """Parameter `name` (and its value) inside an error message: `name=value` in Python, `--name value` on the
    command line (`--flag value` where the option is named otherwise than the parameter)."""
    names = name if flag is None else f'{name}{_ALT}{flag}'
    return f'{_OPEN}param{_SEP}{names}{_SEP}{_NO_VALUE if value is _NO_VALUE else _plain(value)}{_CLOSE}'


def say(python: str, command_line: str) -> str:
    """A part of a message that Python callers and command-line users are told differently."""
    return f'{_OPEN}say{_SEP}{_plain(python)}{_SEP}{_plain(command_line)}{_CLOSE}'


def switch(name: str) -> str:
    """An on/off parameter named inside a message: `name=True` in Python, `--name` on the command line."""
    return say(python=f'{name}=True', command_line='--' + name.replace('_', '-'))


def _spell(match: re.Match, audience: str) -> str:
    kind, first, second = match.groups()
    if kind == 'say':
        return first if audience == PYTHON else second
    python, _, flag = first.partition(_ALT)
    name = python if audience == PYTHON else '--' + (flag or python).replace('_', '-')
    if second == _NO_VALUE:
        return name
    return f'{name}={second}' if audience == PYTHON else f'{name} {second}'


def spelled(text: str, audience: str = PYTHON) -> str:
    """`text` with its parameters and two-way parts told to `audience` (PYTHON or COMMAND_LINE)."""
    return _MARK.sub(lambda m: _spell(m, audience), text)


class UserError(Exception):
    """A mistake or failure that its user can act on (the base of every error this package raises)."""

    exit_code = 1

    @property
    def message(self) -> str:
        """The message with its parameter marks, to be put inside another error's message."""
        return Exception.__str__(self)

    def spelled(self, audience: str = PYTHON) -> str:
        return spelled(self.message, audience)

    def __str__(self) -> str:
        return self.spelled(PYTHON)


class ToolError(UserError, RuntimeError):
    """A failure while working (a file that cannot be written, a model that cannot be loaded): exit status 1."""


class UsageError(ToolError):
    """A mistake in the arguments or inputs, found before any work: exit status 2."""

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
