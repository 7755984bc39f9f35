"""Files that appear whole or not at all, and survive a crash of the machine once written.

`write_atomic` is the one way this package writes an output file: the content goes to a temporary file
with a unique name beside the target (`.NAME.XXXX.tmp`, so two writers never share one), which is
flushed to disk (fsync), renamed over the target, and the folder's entry is made durable too (fsync of
the folder). A reader therefore sees the old file or the complete new one, and a record written after
it (such as a unit's record in an output folder) never outlives its content in a crash.

`OutputLock` makes one job at a time the writer of an output.
"""
from __future__ import annotations

import errno
import fcntl
import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

from .errors import ToolError, UsageError

TEMP_SUFFIX = '.tmp'


class WriteError(ToolError):
    """A file could not be written (disk full, permission denied, ...), said in one line."""


def write_error(path: Path, error: OSError) -> WriteError:
    hint = ': free some space and run the same command to resume' if error.errno in (errno.ENOSPC, errno.EDQUOT) else ''
    return WriteError(f'cannot write {path}: {error.strerror or error}{hint}')


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage(path: Path, write: Callable[[Path], None]) -> Path:
    """A temporary file beside `path` holding what `write(temporary path)` wrote, flushed to disk."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f'.{path.name}.', suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise
    return tmp


def commit(tmp: Path, path: Path) -> int:
    """Rename a staged file to `path` and make the rename durable; return its size in bytes."""
    try:
        size = tmp.stat().st_size
        os.replace(tmp, path)
        fsync_dir(Path(path).parent)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise write_error(path, e) from None
    return size


def write_atomic(path: Path, write: Callable[[Path], None]) -> int:
    """Write `path` by calling `write(temporary path)`, then fsync and rename; return its size in bytes."""
    return commit(stage(path, write), path)


def write_text(path: Path, text: str) -> int:
    return write_atomic(path, lambda p: p.write_text(text, encoding='utf-8'))


def remove_temporary_files(folder: Path) -> None:
    """Delete the temporary files that writers which died left in `folder` (call while holding its lock)."""
    for leftover in folder.glob(f'.*{TEMP_SUFFIX}'):
        leftover.unlink(missing_ok=True)


class OutputLock:
    """An exclusive lock on an output, held until `release` or the process ends.

    A folder's lock file is `FOLDER/.lock`, a single file's `.NAME.lock` beside it. The lock is
    `fcntl.flock`, which the kernel drops when the holding process dies (even by SIGKILL), so nothing
    is left to clean up by hand. The holder writes its host and process id into the file, and a second
    job is refused with them.
    """

    def __init__(self, output: Path, folder: bool = True):
        output = Path(output)
        self.output = output
        self.path = output / '.lock' if folder else output.with_name(f'.{output.name}.lock')
        self.fd: int | None = None

    def acquire(self) -> 'OutputLock':
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(self.path, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode('utf-8', 'replace').strip() or 'another process'
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                raise OutputBusy(f'{self.output} is in use by another embed job ({holder}); wait for it to '
                                 f'end or stop it, then run the same command to resume') from None
            raise write_error(self.path, e) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f'host {socket.gethostname()} pid {os.getpid()}\n'.encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor drops the lock
            self.fd = None

    def __enter__(self) -> 'OutputLock':
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class OutputBusy(UsageError):
    """The output is locked by another job."""
