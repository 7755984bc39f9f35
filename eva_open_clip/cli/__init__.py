"""The `eva-open-clip` command (also `python -m eva_open_clip`): one module per command, each with its
`add_arguments` and `run`, over the plugin and the tools. `main` parses the arguments and turns every
`UserError` (and an interruption) into one line and its exit status, in one place; the commands import
their tools only once their arguments are parsed, and the tools check their arguments before any work."""
from __future__ import annotations

import argparse
import os
import signal
import sys
from types import ModuleType
from typing import Callable, Sequence

from eva_open_clip import __version__
from eva_open_clip.cli import classify, convert, embed, export_onnx, models, run, train
from eva_open_clip.cli.options import register
from eva_open_clip.errors import COMMAND_LINE, UserError
from eva_open_clip.runtime.signals import Interrupted

COMMANDS: dict[str, ModuleType] = {'convert': convert, 'export-onnx': export_onnx, 'models': models,
                                   'classify': classify, 'embed': embed, 'train': train}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='eva-open-clip', description='EVA-CLIP models in open_clip: zero-shot classification, '
                                          'embeddings, fine-tuning, export, and running open_clip tools.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)
    for name, command in COMMANDS.items():
        command.add_arguments(sub.add_parser(name, help=command.HELP, description=command.DESCRIPTION))
    sub.add_parser('run', help=run.HELP, usage=run.USAGE, prog='eva-open-clip run', description=run.DESCRIPTION,
                   add_help=False)
    return parser


def _said(command: str, error: UserError) -> int:
    """A UserError as its one line on standard error, in the command line's terms; its exit status."""
    print(f'eva-open-clip {command}: {error.spelled(COMMAND_LINE)}', file=sys.stderr)
    return error.exit_code


def _reported(command: str, work: Callable[[], int]) -> int:
    """`work()`'s exit status; a UserError or an interruption is one line on standard error and its status."""
    try:
        return work()
    except UserError as e:
        return _said(command, e)
    except Interrupted as e:  # the job's own line (an embed job says how far it got; other ranks say nothing)
        if e.message:
            print(f'eva-open-clip {command}: {e.message}', file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # Ctrl-C outside a job
        print(f'eva-open-clip {command}: interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader of standard output stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: every UserError becomes one line on standard error and its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'run':  # everything after `run` is the target's: its own errors and exit status
        try:
            target = run.prepare(argv[1:])
        except UserError as e:
            return _said('run', e)
        if target:
            run.run_target(target)
        return 0
    args = build_parser().parse_args(argv)

    def work() -> int:
        register(getattr(args, 'register', None))
        return COMMANDS[args.command].run(args)

    return _reported(args.command, work)
