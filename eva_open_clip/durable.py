"""Files that appear whole or not at all, and survive a crash of the machine once written.

`write_atomic` is the one way this package writes an output file: the content goes to a temporary file
with a unique name beside the target (`.NAME.XXXX.tmp`, so two writers never share one), which is
flushed to disk (fsync), renamed over the target, and the folder's entry is made durable too (fsync of
the folder). A reader therefore sees the old file or the complete new one, and a record written after
it (such as a unit's record in an output folder) never outlives its content in a crash. The file gets
the mode that the umask gives a newly created file (as `open()` does), not the temporary file's 0600.
A write that fails because the disk is full says so, whichever layer noticed (an errno, or a short
write reported without one, as numpy and pyarrow do).

`OutputLock` makes one job at a time the writer of an output.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from eva_open_clip.errors import ToolError, UsageError, switch

TEMP_SUFFIX = '.tmp'


class WriteError(ToolError):
    """A file could not be written (disk full, permission denied, ...), said in one line."""


class OutputExists(UsageError, FileExistsError):
    """The folder to write holds something already (replaced only with `force`)."""


_FULL = (errno.ENOSPC, errno.EDQUOT)


def _disk_full(error: OSError, folder: Path) -> bool:
    """Whether `error` means a full disk: its errno says so, or it has none (a short write, as numpy and
    pyarrow report it) and the file system holding `folder` has (next to) no room left for this user."""
    if error.errno in _FULL:
        return True
    if error.errno is not None:
        return False
    try:
        stat = os.statvfs(folder)
    except OSError:
        return False
    return stat.f_bavail * stat.f_frsize < 1 << 20


def write_error(path: Path, error: OSError, full: bool | None = None) -> WriteError:
    """One line for a failed write; `full`: whether the disk was found full (checked here when not given)."""
    path = Path(path)
    if full is None:
        full = _disk_full(error, path.parent)
    if full:
        return WriteError(f'cannot write {path}: the disk is full ({error.strerror or error}): free some space '
                          f'and run the same command to resume')
    return WriteError(f'cannot write {path}: {error.strerror or error}')


def umask() -> int:
    """The process's umask (read without changing it where /proc tells it)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode `open()` gives a new file: 0666 less the umask."""
    return 0o666 & ~umask()


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
    tmp = Path(name)
    try:
        os.fchmod(fd, new_file_mode())
        os.close(fd)
        write(tmp)
        with open(tmp, 'rb+') as f:
            os.fsync(f.fileno())
    except BaseException as e:
        full = isinstance(e, OSError) and _disk_full(e, path.parent)  # before the partial file frees its room
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e, full) from None
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


_TEMPORARY = re.compile(r'\.(?P<name>.+)\.[a-z0-9_]{8}' + re.escape(TEMP_SUFFIX))


def temporary_target(name: str) -> str | None:
    """The file a temporary file of `stage` was to become (`.NAME.XXXXXXXX.tmp` -> NAME), else None."""
    match = _TEMPORARY.fullmatch(name)
    return match.group('name') if match else None


def remove_temporary_files(folder: Path, targets: re.Pattern) -> None:
    """Delete the temporary files that writers which died left in `folder` for files whose names match
    `targets` (call while holding its lock); nothing else is touched."""
    for leftover in folder.iterdir():
        target = temporary_target(leftover.name)
        if target is not None and targets.fullmatch(target):
            leftover.unlink(missing_ok=True)


def check_empty(out: Path, force: bool) -> None:
    """Raise OutputExists unless `out` is absent or an empty folder, or `force` allows replacing it."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise OutputExists(f"{out} exists and is not empty (use {switch('force')} to replace it)")


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` to disk."""
    for root, _dirs, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), 'rb') as f:
                os.fsync(f.fileno())
        fsync_dir(Path(root))


def write_folder(out: Path, fill: Callable[[Path], None], force: bool = False) -> Path:
    """Write the folder `out` whole or not at all: `fill(staging folder)` writes its files into a fresh
    folder beside it, which is flushed to disk and then replaces `out` (only with `force` if `out` holds
    anything); on any failure the staging folder is removed and `out` is left as it was."""
    out = Path(out)
    check_empty(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out.name}.', dir=out.parent))
    os.chmod(staging, 0o777 & ~umask())  # the folder's mode as mkdir gives it, not mkdtemp's 0700
    try:
        fill(staging)
        _fsync_tree(staging)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f'.{out.name}.old.', dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(staging, out)
            shutil.rmtree(old)
        else:
            os.replace(staging, out)
        fsync_dir(out.parent)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
