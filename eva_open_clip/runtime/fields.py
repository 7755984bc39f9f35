"""A tool's options as one dataclass whose fields say how the command line spells them: the Python call's keywords
checked against the fields, and the command line's flags derived from them (`embed.options`, `train.options`)."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any, Callable, Iterable, Mapping

from eva_open_clip.errors import UsageError, did_you_mean


def option(default: Any, help: str | None = None, *, recorded: bool = False, flag: str | None = None,
           group: str | None = None, **cli: Any) -> Any:
    """A field of a tool's options: its default, its help, whether an output records it, and its command-line
    spelling (`flag` for a name of its own, `group` for the help's section, argparse keywords)."""
    return dataclasses.field(default=default,
                             metadata=dict(help=help, recorded=recorded, flag=flag, group=group, cli=cli))


def check_keywords(options: type, call: str, keywords: Mapping[str, Any], positional: str) -> None:
    """A keyword that is not an option of `call` is refused, naming the closest."""
    names = [f.name for f in dataclasses.fields(options)]
    for name in keywords:
        if name not in names or name == positional:
            raise UsageError(f'{call}() takes no option {name}{did_you_mean(name, names)}')


def add_flags(parser: argparse.ArgumentParser, options: type, leave_out: Iterable[str] = (),
              positional: str | None = None) -> None:
    """A flag for each field of `options` (its help's section made once), but those `leave_out` names; the field
    `positional` an argument without a flag."""
    groups: dict[str | None, Any] = {None: parser}
    for f in dataclasses.fields(options):
        if f.name in leave_out:
            continue
        meta = f.metadata
        where = groups.get(meta['group']) or groups.setdefault(meta['group'], parser.add_argument_group(meta['group']))
        cli = dict(meta['cli'])
        if f.name == positional:
            where.add_argument(f.name, help=meta['help'], **cli)
            continue
        if f.type == 'bool':
            cli.setdefault('action', 'store_true')
        default = [] if cli.get('action') == 'append' else f.default
        where.add_argument('--' + (meta['flag'] or f.name).replace('_', '-'), dest=f.name, default=default,
                           help=meta['help'], **cli)


def call_signature(function: Callable, options: type, positional: str, required: Iterable[str]) -> inspect.Signature:
    """A tool's Python signature as its options make it: `positional`, then every other option by keyword (those in
    `required` without a default)."""
    required = set(required)
    parameters = [inspect.Parameter(positional, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=())]
    parameters += [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=f.type,
                                     default=inspect.Parameter.empty if f.name in required else f.default)
                   for f in dataclasses.fields(options) if f.name != positional]
    return inspect.signature(function).replace(parameters=parameters)
