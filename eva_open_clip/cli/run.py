"""`eva-open-clip run`: run an existing tool (a module or a script) with the EVA models registered."""
from __future__ import annotations

import argparse
import importlib.util
import runpy
import sys
from pathlib import Path
from typing import Sequence

from eva_open_clip.cli.options import REGISTER_FORM, register, register_option
from eva_open_clip.errors import UsageError

HELP = 'run a module or script with the EVA models registered'
USAGE = 'eva-open-clip run [--register NAME=CONFIG.json ...] (-m MODULE | SCRIPT) [ARGS ...]'
DESCRIPTION = ('Like `python -m MODULE ARGS` (or `python SCRIPT ARGS`), after registering the EVA models, e.g. '
               '`eva-open-clip run -m open_clip_train.main --model EVA_CLIP_g_14 ...`. --register '
               'NAME=CONFIG.json (repeatable) also registers a custom EVA-CLIP config. Arguments and exit '
               'codes pass through untouched.')


def help_parser() -> argparse.ArgumentParser:
    """The parser that only prints `run`'s help: its arguments are the target's, never parsed here."""
    return argparse.ArgumentParser(prog='eva-open-clip run', usage=USAGE, description=DESCRIPTION, add_help=False)


def split_run_args(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(the `--register NAME=CONFIG.json` values, the target and its arguments) of `run`'s arguments.

    The target is checked to exist: a `-m MODULE` that is importable, or a script file.
    """
    argv, registrations = list(argv), []
    while argv and argv[0] == '--register':
        if len(argv) < 2:
            raise UsageError(f'--register takes {REGISTER_FORM}')
        register_option(argv[1])
        registrations.append(argv[1])
        argv = argv[2:]
    if len(argv) >= 2 and argv[0] == '-m':
        if importlib.util.find_spec(argv[1]) is None:
            raise UsageError(f'-m {argv[1]}: no module of that name is installed in this environment')
    elif argv and not argv[0].startswith('-'):
        if not Path(argv[0]).is_file():
            raise UsageError(f'{argv[0]}: no such script')
    else:
        raise UsageError(f'give -m MODULE or a SCRIPT to run (usage: {USAGE})')
    return registrations, argv


def run_target(argv: Sequence[str]) -> None:
    """Run a module (`-m MODULE ARGS`) or script (`SCRIPT ARGS`) as `__main__`, with the EVA models registered.

    Arguments reach the target untouched; its exit code (SystemExit) passes through.
    """
    from eva_open_clip.open_clip_seam import accept_cpu_device_ids_in_ddp
    accept_cpu_device_ids_in_ddp()
    if argv[0] == '-m':
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name='__main__', alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name='__main__')


def prepare(argv: list[str]) -> list[str] | None:
    """The target and its arguments, with the `--register` models registered; None after printing the help."""
    if argv in (['-h'], ['--help']):
        help_parser().print_help()
        return None
    registrations, target = split_run_args(argv)
    register(registrations)
    return target
