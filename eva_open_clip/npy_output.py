"""`embed --out FILE.npy` (small jobs): one float32 array, row i for line i of FILE.paths.txt.

Rows are appended to a scratch file as they come; at the end FILE.paths.txt and FILE.npy are each
written with `durable.write_atomic`, so an interrupted run leaves an older output as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from numpy.lib import format as npy_format

from .data import IMAGE_KEYS, Skip
from .durable import commit, stage
from .errors import UsageError
from .inference import Encoder
from .loader import Batch, DecodedBatches, UnitDataset
from .progress import progress_bar
from .units import list_units


def paths_file(out: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    return out.with_name(out.name[:-len('.npy')] + '.paths.txt' if out.name.endswith('.npy') else out.name + '.paths.txt')


class _Rows:
    """float32 rows appended to a scratch file beside the output; `save` writes them as one .npy array."""

    def __init__(self, folder: Path):
        fd, name = tempfile.mkstemp(prefix='.embed-rows.', suffix='.tmp', dir=folder)
        self.path = Path(name)
        self.file = os.fdopen(fd, 'wb')
        self.rows, self.dim = 0, 0

    def append(self, rows: np.ndarray) -> None:
        self.dim = rows.shape[1]
        self.file.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        self.rows += rows.shape[0]

    def stage(self, path: Path) -> Path:
        self.file.flush()

        def write(tmp: Path) -> None:
            header = {'descr': npy_format.dtype_to_descr(np.dtype(np.float32)), 'fortran_order': False,
                      'shape': (self.rows, self.dim)}
            with open(tmp, 'wb') as f, open(self.path, 'rb') as rows:
                npy_format.write_array_header_1_0(f, header)
                shutil.copyfileobj(rows, f, 1 << 24)

        return stage(path, write)

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
    """Write FILE.npy and FILE.paths.txt; return the number of rows and the samples skipped."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, keys, skipped = _Rows(out.parent), [], []
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
        array = rows.stage(out)
        try:
            paths = stage(paths_file(out), lambda p: p.write_text(''.join(f'{k}\n' for k in keys), encoding='utf-8'))
            commit(paths, paths_file(out))  # the two renames follow each other: both files are already on disk
            commit(array, out)
        finally:
            array.unlink(missing_ok=True)
    finally:
        rows.discard()
    return len(keys), skipped
