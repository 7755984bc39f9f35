"""One writer per output: an exclusive `flock` on a lock file beside it, naming its holder."""
from __future__ import annotations

import errno
import fcntl
import os
import socket
from pathlib import Path

from eva_open_clip.durable import write_error
from eva_open_clip.errors import UsageError


class OutputLock:
    """An exclusive lock on an output, held until `release` or the process ends.

    A folder's lock file is `FOLDER/.lock`, a single file's `.NAME.lock` beside it. The lock is
    `fcntl.flock`, which the kernel drops when the holding process dies (even by SIGKILL), so nothing
    is left to clean up by hand. The holder writes its host and process id into the file, and a second
    job is refused with them.
    """

    def __init__(self, path: Path, output: Path):
        self.path, self.output = Path(path), Path(output)
        self.fd: int | None = None

    @classmethod
    def for_folder(cls, folder: Path) -> 'OutputLock':
        return cls(Path(folder) / '.lock', folder)

    @classmethod
    def for_file(cls, file: Path) -> 'OutputLock':
        file = Path(file)
        return cls(file.with_name(f'.{file.name}.lock'), file)

    def acquire(self) -> 'OutputLock':
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
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
