"""`embed --out FILE.npy` (small jobs): one float32 array, row i for line i of FILE.paths.txt.

Rows are written as they come into FILE.npy under a temporary name. Names are written by the rule of
`names.py` (one line each, whatever bytes a name holds). At the end both files are flushed to disk
under temporary names and committed together: a journal (`.FILE.npy.commit`) names them, an older
FILE.npy is removed, then both are renamed into place and the journal removed. A run killed before
the journal leaves an older output as it was; one killed after it leaves no FILE.npy beside a
FILE.paths.txt of another run (so no reader can pair the wrong rows and lines), and the next run
(under the output's lock) completes the commit first.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from eva_open_clip.durable import (
    TEMP_SUFFIX,
    fsync_dir,
    new_file_mode,
    remove_temporary_files,
    stage,
    write_error,
    write_text,
)
from eva_open_clip.embed.store.lock import OutputLock
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.errors import ToolError


def paths_file(out: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    stem = out.name[:-len('.npy')] if out.name.endswith('.npy') else out.name
    return out.with_name(stem + '.paths.txt')


class _Rows:
    """float32 rows written straight into the future FILE.npy under a temporary name; `commit` renames it.

    The .npy header has a fixed size here (128 bytes, room for any row count), written last, so the
    array is never copied: the output takes its own size on disk, once.
    """

    HEADER = 128

    def __init__(self, out: Path):
        fd, name = tempfile.mkstemp(prefix=f'.{out.name}.', suffix=TEMP_SUFFIX, dir=out.parent)
        os.fchmod(fd, new_file_mode())
        self.path = Path(name)
        self.file = os.fdopen(fd, 'wb')
        self.file.write(b'\0' * self.HEADER)
        self.rows, self.dim = 0, 0
        self.finished = False  # once finished, the file is the commit's to rename or the next run's to remove

    def append(self, rows: np.ndarray) -> None:
        self.dim = rows.shape[1]
        self.file.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        self.rows += rows.shape[0]

    def _header(self) -> bytes:
        """numpy's own version 1.0 header; numpy pads it to 128 bytes for any row count this can hold."""
        header = io.BytesIO()
        shape = (self.rows, self.dim)
        np.lib.format.write_array_header_1_0(header, dict(descr='<f4', fortran_order=False, shape=shape))
        if len(header.getvalue()) != self.HEADER:
            raise ToolError(f'{self.path}: numpy wrote a .npy header of {len(header.getvalue())} bytes, '
                            f'not the {self.HEADER} reserved')
        return header.getvalue()

    def finish(self) -> Path:
        """Write the header and flush the file to disk; return its temporary path."""
        try:
            self.file.seek(0)
            self.file.write(self._header())
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
        except OSError as e:
            raise write_error(self.path, e) from None
        self.finished = True
        return self.path

    def discard(self) -> None:
        """Remove the rows of a run that did not get as far as its commit."""
        self.file.close()
        if not self.finished:
            self.path.unlink(missing_ok=True)


def _journal(out: Path) -> Path:
    return out.with_name(f'.{out.name}.commit')


def _complete_commit(out: Path) -> None:
    """Rename the files a journal names into place (both are on disk), then remove the journal."""
    journal = _journal(out)
    staged = json.loads(journal.read_text(encoding='utf-8'))
    try:
        for name, target in ((staged['paths'], paths_file(out)), (staged['npy'], out)):
            if (out.parent / name).exists():
                os.replace(out.parent / name, target)
        fsync_dir(out.parent)
        journal.unlink()
        fsync_dir(out.parent)
    except OSError as e:
        raise write_error(out, e) from None


def _commit_pair(array: Path, paths: Path, out: Path) -> None:
    write_text(_journal(out), json.dumps(dict(npy=array.name, paths=paths.name)))
    out.unlink(missing_ok=True)  # from here on no FILE.npy stands beside a FILE.paths.txt of another run
    _complete_commit(out)


class NpyWriter:
    """The rows of one FILE.npy as they come, and `commit`, which puts them in place with their names."""

    def __init__(self, out: Path):
        self.out = out
        self.rows = _Rows(out)

    def append(self, rows: np.ndarray) -> None:
        self.rows.append(rows)

    def commit(self, names: Sequence[str | bytes]) -> None:
        """FILE.npy and FILE.paths.txt (row i is `names[i]`), committed together."""
        array = self.rows.finish()
        paths = stage(paths_file(self.out), lambda p: p.write_text(''.join(f'{name_text(k)}\n' for k in names),
                                                                   encoding='utf-8'))
        _commit_pair(array, paths, self.out)


@contextlib.contextmanager
def npy_output(out: str | os.PathLike) -> Iterator[NpyWriter]:
    """A writer of FILE.npy under its lock (`.FILE.npy.lock`: one job at a time), after completing a commit that a
    killed job left half done and removing the temporary files it left beside the outputs. Rows that are not
    committed are removed on the way out."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock.for_file(out):
        try:
            if _journal(out).exists():
                _complete_commit(out)
        except (ValueError, KeyError):  # a journal cut short: it was not complete, so nothing was renamed
            _journal(out).unlink()
        ours = '|'.join(re.escape(p.name) for p in (out, paths_file(out), _journal(out)))
        remove_temporary_files(out.parent, re.compile(ours))
        writer = NpyWriter(out)
        try:
            yield writer
        finally:
            writer.rows.discard()
