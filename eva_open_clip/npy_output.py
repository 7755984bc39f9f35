"""`embed --out FILE.npy` (small jobs): one float32 array, row i for line i of FILE.paths.txt.

Rows are written as they come into FILE.npy under a temporary name; at the end FILE.paths.txt and
FILE.npy are flushed to disk and renamed into place one right after the other, so an interrupted run
leaves an older output as it was.
"""
from __future__ import annotations

import glob
import os
import struct
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .data import IMAGE_KEYS, Skip
from .durable import TEMP_SUFFIX, OutputLock, commit, stage, write_error
from .errors import UsageError
from .inference import Encoder
from .loader import Batch, DecodedBatches, UnitDataset
from .progress import progress_bar
from .units import list_units


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
        self.path = Path(name)
        self.file = os.fdopen(fd, 'wb')
        self.file.write(b'\0' * self.HEADER)
        self.rows, self.dim = 0, 0

    def append(self, rows: np.ndarray) -> None:
        self.dim = rows.shape[1]
        self.file.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        self.rows += rows.shape[0]

    def _header(self) -> bytes:
        text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({self.rows}, {self.dim}), }}"
        body = text.ljust(self.HEADER - 11) + '\n'  # 10 bytes of magic, version and length before it
        return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(body)) + body.encode('latin1')

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
        return self.path

    def discard(self) -> None:
        self.file.close()
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


def embed_to_npy(encoder: Encoder, inputs: Sequence[str], out: str | os.PathLike, batch_size: int = 32,
                 text_file: str | None = None, files_from: str | None = None, workers: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS) -> tuple[int, list[Skip]]:
    """Write FILE.npy and FILE.paths.txt; return the number of rows and the samples skipped.

    One job at a time writes an output (its lock, `.FILE.npy.lock`); the temporary files that a killed
    job left beside the outputs are removed first.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with OutputLock(out, folder=False):
        for target in (out, paths_file(out)):
            for stale in out.parent.glob(f'.{glob.escape(target.name)}.*{TEMP_SUFFIX}'):
                stale.unlink()
        return _embed_to_npy(encoder, inputs, out, batch_size, text_file, files_from, workers, image_keys)


def _embed_to_npy(encoder: Encoder, inputs: Sequence[str], out: Path, batch_size: int, text_file: str | None,
                  files_from: str | None, workers: int, image_keys: Sequence[str]) -> tuple[int, list[Skip]]:
    rows, keys, skipped = _Rows(out), [], []
    try:
        if text_file:
            lines = [line for line in Path(text_file).read_text(encoding='utf-8').splitlines() if line.strip()]
            with progress_bar('text', total=len(lines)) as progress:
                for start in range(0, len(lines), batch_size):
                    chunk = lines[start:start + batch_size]
                    rows.append(encoder.texts(chunk).numpy())
                    keys += chunk
                    progress.update(len(chunk))
        else:
            units = list_units(inputs, files_from, 10_000)
            dataset = UnitDataset(units, encoder.preprocess, batch_size, image_keys=image_keys)
            with progress_bar('img', total=sum(len(u.files) for u in units) or None) as progress:
                for batch in _in_input_order(DecodedBatches(dataset, workers, encoder.device_type)):
                    skipped += batch.skipped
                    if batch.pixels is not None:
                        rows.append(encoder.encode_pixels(batch.pixels).numpy())
                        keys += batch.keys
                    progress.update(len(batch.keys) + len(batch.skipped))
        if not keys:
            raise UsageError('no input could be decoded' if skipped else 'nothing to embed')
        array = rows.finish()
        paths = stage(paths_file(out), lambda p: p.write_text(''.join(f'{k}\n' for k in keys), encoding='utf-8'))
        commit(paths, paths_file(out))  # the two renames follow each other: both files are already on disk
        commit(array, out)
    finally:
        rows.discard()
    return len(keys), skipped
