"""`eva-open-clip embed`: L2-normalized float32 features of many images (or lines of text) to a .npy file.

Batches are streamed: features go to disk as they are computed, so memory stays flat on large
folders. Row i of FILE.npy belongs to line i of FILE.paths.txt. Both files are written under temporary
names and renamed into place at the end, so an interrupted run leaves no partial output.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
from numpy.lib import format as npy_format
from tqdm import tqdm

from .inference import Encoder, ToolError, batches, decode, image_files, warn_skipped


def paths_file(out: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    return out.with_name(out.name[:-len('.npy')] + '.paths.txt' if out.name.endswith('.npy') else out.name + '.paths.txt')


class _RowWriter:
    """Appends float32 rows to a scratch file; `finish` writes them as one .npy array."""

    def __init__(self, folder: Path):
        fd, name = tempfile.mkstemp(prefix='.embed-rows.', dir=folder)
        self.path = Path(name)
        self.file = os.fdopen(fd, 'wb')
        self.rows, self.dim = 0, None

    def write(self, rows: np.ndarray) -> None:
        self.dim = rows.shape[1]
        self.file.write(np.ascontiguousarray(rows, dtype=np.float32).tobytes())
        self.rows += rows.shape[0]

    def finish(self, out: Path) -> Path:
        self.file.close()
        fd, name = tempfile.mkstemp(prefix='.embed-npy.', dir=out.parent)
        with os.fdopen(fd, 'wb') as f, open(self.path, 'rb') as rows:
            header = {'descr': npy_format.dtype_to_descr(np.dtype(np.float32)), 'fortran_order': False,
                      'shape': (self.rows, self.dim or 0)}
            npy_format.write_array_header_1_0(f, header)
            shutil.copyfileobj(rows, f, 1 << 24)
        return Path(name)

    def discard(self) -> None:
        self.file.close()
        self.path.unlink(missing_ok=True)


def embed(encoder: Encoder, inputs: Sequence[str], out: str | os.PathLike, batch_size: int = 32,
          text_file: str | None = None) -> int:
    """Write FILE.npy and FILE.paths.txt; return the number of rows. Undecodable images are skipped."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if text_file:
        items: list = [line for line in Path(text_file).read_text(encoding='utf-8').splitlines() if line.strip()]
    else:
        items = image_files(inputs)
    if not items:
        raise ToolError('nothing to embed')
    writer = _RowWriter(out.parent)
    kept: list[str] = []
    skipped: list[str] = []
    staged: list[Path] = []
    try:
        with tqdm(total=len(items), unit='text' if text_file else 'img', file=sys.stderr) as progress:
            for chunk in batches(items, batch_size):
                if text_file:
                    features, names = encoder.texts(chunk), list(chunk)
                else:
                    kept_paths, images, failed = decode(chunk)
                    skipped += failed
                    names = [str(p) for p in kept_paths]
                    features = encoder.images(images) if images else None
                if features is not None:
                    writer.write(features.numpy())
                    kept += names
                progress.update(len(chunk))
        if not kept:
            raise ToolError('no input could be decoded')
        staged.append(writer.finish(out))
        fd, name = tempfile.mkstemp(prefix='.embed-paths.', dir=out.parent)
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(''.join(f'{k}\n' for k in kept))
        staged.append(Path(name))
        os.replace(staged[1], paths_file(out))
        os.replace(staged[0], out)
    finally:
        writer.discard()
        for path in staged:
            path.unlink(missing_ok=True)
    warn_skipped(skipped)
    return len(kept)
