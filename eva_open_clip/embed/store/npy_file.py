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

import io
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from eva_open_clip.embed.defaults import IMAGE_KEYS
from eva_open_clip.embed.inputs import InputError
from eva_open_clip.embed.decode import PixelLimits
from eva_open_clip.embed.skips import Skip
from eva_open_clip.durable import (TEMP_SUFFIX, fsync_dir, new_file_mode, remove_temporary_files, stage, write_error,
                                   write_text)
from eva_open_clip.embed.store.lock import OutputLock
from eva_open_clip.errors import ToolError, UsageError
from eva_open_clip.embed.encoder import Encoder
from eva_open_clip.embed.loader import Batch, DecodedBatches, UnitDataset
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.progress import Progress, plural
from eva_open_clip.embed.units import list_units


def paths_file(out: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    return out.with_name(out.name[:-len('.npy')] + '.paths.txt' if out.name.endswith('.npy') else out.name + '.paths.txt')


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


def _in_input_order(batches: DecodedBatches) -> Iterator[Batch]:
    """The batches of units in unit order: units arrive interleaved from the workers."""
    pending: dict[int, list[Batch]] = {}
    following = 0
    for batch in batches:
        pending.setdefault(batch.unit, []).append(batch)
        while pending.get(following) and pending[following][-1].end:
            yield from pending.pop(following)
            following += 1


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


def embed_to_npy(load_encoder: Callable[[], Encoder], inputs: Sequence[str], out: str | os.PathLike,
                 batch_size: int = 32, text_file: str | None = None, files_from: str | None = None, workers: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS, limits: PixelLimits | None = None,
                 quiet: bool = False, progress_interval: float | None = None) -> tuple[int, list[Skip]]:
    """Write FILE.npy and FILE.paths.txt; return the number of rows and the samples skipped.

    The inputs are listed (or the text file read) before `load_encoder` is called, so that a mistake in
    them is found before the model is loaded. One job at a time writes an output (its lock,
    `.FILE.npy.lock`); a commit that a killed job left half done is completed, and the temporary files it
    left beside the outputs are removed, first.
    """
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
        if text_file:
            lines = _text_lines(text_file)
            if not lines:
                raise UsageError(f'--text-file {text_file}: holds no line of text')
            progress = Progress(len(lines), 'text', interval=progress_interval, enabled=not quiet)
            return _embed_lines(load_encoder(), lines, out, batch_size, progress)
        units, duplicates = list_units(inputs, files_from, 10_000)
        if duplicates.note():
            print(duplicates.note(), file=sys.stderr)
        progress = Progress(sum(len(u.files) for u in units) or None, 'image', interval=progress_interval,
                            enabled=not quiet)
        return _embed_images(load_encoder(), units, out, batch_size, workers, image_keys, limits, progress)


def _text_lines(text_file: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (split at \\n; a final \\r is dropped)."""
    try:
        raw = Path(text_file).read_bytes()
    except OSError as e:
        raise InputError(f'--text-file {text_file}: {e.strerror or e}') from None
    lines = []
    for number, line in enumerate(raw.split(b'\n'), 1):
        try:
            text = line.decode('utf-8').removesuffix('\r')
        except UnicodeDecodeError:
            raise InputError(f'--text-file {text_file}: line {number} is not UTF-8 text') from None
        if text.strip():
            lines.append(text)
    return lines


def _embed_lines(encoder: Encoder, lines: list[str], out: Path, batch_size: int,
                 progress: Progress) -> tuple[int, list[Skip]]:
    rows = _Rows(out)
    try:
        for start in range(0, len(lines), batch_size):
            chunk = lines[start:start + batch_size]
            rows.append(encoder.texts(chunk).numpy())
            progress.update(len(chunk))
        _commit(rows, lines, out)
    finally:
        progress.close()
        rows.discard()
    return len(lines), []


def _embed_images(encoder: Encoder, units: list, out: Path, batch_size: int, workers: int,
                  image_keys: Sequence[str], limits: PixelLimits | None, progress: Progress) -> tuple[int, list[Skip]]:
    rows, keys, skipped = _Rows(out), [], []
    try:
        dataset = UnitDataset(units, encoder.preprocess, batch_size, image_keys=image_keys, limits=limits)
        decoding = DecodedBatches(dataset, min(workers, len(units)), encoder.device_type)
        for batch in _in_input_order(decoding):
            skipped += batch.skipped
            if batch.pixels is not None:
                rows.append(encoder.encode_pixels(batch.pixels).numpy())
                keys += batch.keys
            progress.update(len(batch.keys) + len(batch.skipped))
        if not keys:
            raise ToolError(f'no input could be decoded ({plural(len(skipped), "sample")} skipped)' if skipped
                            else 'nothing to embed')
        _commit(rows, keys, out)
    finally:
        progress.close()
        rows.discard()
    return len(keys), skipped


def _commit(rows: _Rows, keys: list, out: Path) -> None:
    array = rows.finish()
    paths = stage(paths_file(out), lambda p: p.write_text(''.join(f'{name_text(k)}\n' for k in keys),
                                                         encoding='utf-8'))
    _commit_pair(array, paths, out)
