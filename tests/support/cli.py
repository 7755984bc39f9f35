"""The one way the tests run the command line: in a new interpreter (`run_cli`: the installed `eva-open-clip`
command, as users run it, so that the package is the installed one wherever the tests run from), or
through its entry point in this process (`main_here`, a second instead of an interpreter's imports)."""
from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
from typing import Sequence

COMMANDS = {'module': [sys.executable, '-m', 'eva_open_clip'], 'console': ['eva-open-clip']}
# two ranks on this machine; --standalone lets torchrun pick a free port for its rendezvous
TORCHRUN = (sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
            '-m', 'eva_open_clip')


def command(*args, entry: str = 'console', launcher: Sequence[str] | None = None) -> list[str]:
    """`eva-open-clip ARGS` as a command line, by `entry` (`module` or `console`) or after another launcher."""
    return [*(launcher or COMMANDS[entry]), *map(str, args)]


def run_cli(*args, env: dict | None = None, entry: str = 'console', launcher: Sequence[str] | None = None,
            background: bool = False, timeout: float = 600, **kwargs):
    """`eva-open-clip ARGS` in a new process: its CompletedProcess (text), or with `background` its Popen."""
    cmd = command(*args, entry=entry, launcher=launcher)
    environment = dict(os.environ, **(env or {}))
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                **kwargs)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=environment, **kwargs)


def main_here(*args) -> subprocess.CompletedProcess:
    """`eva-open-clip ARGS` through `cli.main` in this process: exit status, standard output and error.

    argparse's own exits become the status; the signal handlers `embed` installs and torch's thread count are
    put back."""
    import torch

    from eva_open_clip import cli
    argv = [str(a) for a in args]
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:
                code = e.code
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The last line on standard error of a command that exited with `code`, with no traceback before it."""
    assert result.returncode == code, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    return result.stderr.strip().splitlines()[-1]


def only_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one line on standard error of a command that exited with `code`."""
    line = error_line(result, code)
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    return line
