"""Stopping a job on SIGTERM (a scheduler's preemption) or SIGINT (Ctrl-C): the job raises `Interrupted` where it
is, leaves its output resumable, and a second signal ends the process at once.

Where it is, but never inside the standard library's lock handling: an exception raised there (Python runs a
signal's handler between any two instructions) can leave a lock held for good, e.g. a `queue.Queue`'s after
`Condition.__enter__` took it and before the `with` began, and then the job's own clean-up (the part writer's
last call, the DataLoader's shutdown) waits on it forever (about 1 in 100 signals so, on a loop of queue puts).
There the raise is put off by a few milliseconds (SIGALRM) until the main thread has left that code or waits
in a blocking acquire, where an exception is handled.
"""
from __future__ import annotations

import contextlib
import linecache
import multiprocessing.queues
import multiprocessing.synchronize
import os
import queue
import signal
import threading
from types import FrameType
from typing import Iterator

_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_LOCK_CODE = {m.__file__ for m in (threading, queue, multiprocessing.queues, multiprocessing.synchronize)}
RETRY_S = 0.005


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


def in_lock_handling(frame: FrameType | None) -> bool:
    """Whether `frame` (where a handler runs) is the standard library taking or giving back a lock, where an
    exception could leave one held; a blocking wait for a lock (`Condition.wait`, `Thread.join`) is not."""
    if frame is None or frame.f_code.co_filename not in _LOCK_CODE:
        return False
    waiting = frame.f_code.co_name in ('wait', '_wait_for_tstate_lock') and \
        'acquire(' in linecache.getline(frame.f_code.co_filename, frame.f_lineno)
    return not waiting


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within this block SIGTERM and SIGINT raise `Interrupted` (in the main thread; elsewhere nothing changes);
    the handlers that were there before (SIGALRM's too, used to put the raise off) are put back after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []  # the signal received, until it is raised
    raised = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal raised
        if signum == signal.SIGALRM:
            if raised or not pending:
                return
            signum = pending[0]
        elif pending:
            os._exit(128 + signum)  # a second signal: at once
        else:
            pending.append(signum)
        if in_lock_handling(frame):
            signal.setitimer(signal.ITIMER_REAL, RETRY_S)
            return
        raised = True
        for s in _SIGNALS:
            signal.signal(s, lambda n, _f: os._exit(128 + n))
        raise Interrupted(signum)

    before = {s: signal.getsignal(s) for s in (*_SIGNALS, signal.SIGALRM)}
    for s in before:
        signal.signal(s, handler)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, previous in before.items():
            signal.signal(s, previous)
