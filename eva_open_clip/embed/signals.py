"""Stopping a job on SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C): the job raises `Interrupted` where it
is, leaves its output resumable, and a second signal ends the process at once."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
    """The job was stopped by a signal (`signum`); its output folder resumes where it stopped."""

    def __init__(self, signum: int, message: str = 'interrupted'):
        super().__init__(message)
        self.signum, self.message = signum, message

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block SIGTERM and SIGINT raise `Interrupted` (in the main thread; elsewhere nothing changes);
    the handlers that were there before are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame) -> None:
        for s in _SIGNALS:
            signal.signal(s, lambda n, _f: os._exit(128 + n))
        raise Interrupted(signum)

    before = {s: signal.getsignal(s) for s in _SIGNALS}
    for s in _SIGNALS:
        signal.signal(s, handler)
    try:
        yield
    finally:
        for s, previous in before.items():
            signal.signal(s, previous)
