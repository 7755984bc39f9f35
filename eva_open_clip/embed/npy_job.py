"""`embed --out FILE.npy` (small jobs): the images or text lines of the inputs, encoded into one array in input
order, row i for line i of FILE.paths.txt (written by `store.npy_file`, whole or not at all). Images go the one
path of `job` (the folder job's); batches are encoded as the workers deliver them and their rows put back in
input order, so what waits for its turn is float32 rows, never a batch of pixels."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from eva_open_clip.embed.inputs import InputError
from eva_open_clip.embed.job import EncodedUnits, Reading, named_shards
from eva_open_clip.embed.loader import Batch
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.store.npy_file import NpyWriter, npy_output
from eva_open_clip.embed.units import Unit, list_units
from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.encoder import Encoder
from eva_open_clip.runtime.progress import Progress, plural
from eva_open_clip.runtime.skips import UNREADABLE, Skip


def embed_to_npy(load_encoder: Callable[[], Encoder], inputs: Sequence[str], out: str | os.PathLike,
                 batch_size: int = 32, text_file: str | None = None, files_from: str | None = None, workers: int = 0,
                 quiet: bool = False, progress_interval: float | None = None, give_up: Sequence[str] = (),
                 reading: Reading = Reading()) -> tuple[int, list[Skip]]:
    """Write FILE.npy and FILE.paths.txt; return the number of rows and the samples skipped.

    The inputs are listed (or the text file read) before `load_encoder` is called, so that a mistake in
    them is found before the model is loaded. The shards `give_up` names are left out. A shard that cannot
    be read is a `ToolError` naming each such shard, and nothing is written.
    """
    with npy_output(out) as writer:
        if text_file:
            lines = _text_lines(text_file)
            if not lines:
                raise UsageError(f"{param('text_file', text_file)}: holds no line of text")
            progress = Progress(len(lines), 'text', interval=progress_interval, enabled=not quiet)
            return _embed_lines(load_encoder(), lines, writer, batch_size, progress)
        units, listing = list_units(inputs, files_from, 10_000)
        given_up = named_shards(units, give_up)
        units = [u for u in units if u.index not in given_up]
        for note in listing.notes():
            print(note, file=sys.stderr)
        progress = Progress(sum(len(u.files) for u in units) or None, 'image', interval=progress_interval,
                            enabled=not quiet)
        return _embed_images(load_encoder(), reading, units, writer, batch_size, workers, progress)


def _text_lines(text_file: str) -> list[str]:
    """The non-blank lines of a UTF-8 text file (split at \\n; a final \\r is dropped)."""
    try:
        raw = Path(text_file).read_bytes()
    except OSError as e:
        raise InputError(f"{param('text_file', text_file)}: {e.strerror or e}") from None
    lines = []
    for number, line in enumerate(raw.split(b'\n'), 1):
        try:
            text = line.decode('utf-8').removesuffix('\r')
        except UnicodeDecodeError:
            raise InputError(f"{param('text_file', text_file)}: line {number} is not UTF-8 text") from None
        if text.strip():
            lines.append(text)
    return lines


def _embed_lines(encoder: Encoder, lines: list[str], writer: NpyWriter, batch_size: int,
                 progress: Progress) -> tuple[int, list[Skip]]:
    try:
        for start in range(0, len(lines), batch_size):
            chunk = lines[start:start + batch_size]
            writer.append(encoder.texts(chunk).numpy())
            progress.update(len(chunk))
        writer.commit(lines)
    finally:
        progress.close()
    return len(lines), []


def _in_input_order(encoded: Iterable[tuple[Batch, np.ndarray | None, object]], units: Sequence[Unit]
                    ) -> Iterator[tuple[Batch, np.ndarray | None]]:
    """The encoded batches of units in unit order: units arrive interleaved from the workers; a unit read again
    from its start (`restart`) forgets what it gave before. What waits holds rows, not pixels."""
    order = [u.index for u in units]
    pending: dict[int, list[tuple[Batch, np.ndarray | None]]] = {}
    following = 0
    for batch, image, _ in encoded:
        if batch.restart:
            pending.pop(batch.unit, None)
            continue
        pending.setdefault(batch.unit, []).append((batch, image))
        while following < len(order) and pending.get(order[following]) and pending[order[following]][-1][0].end:
            yield from pending.pop(order[following])
            following += 1


def _embed_images(encoder: Encoder, reading: Reading, units: list[Unit], writer: NpyWriter, batch_size: int,
                  workers: int, progress: Progress) -> tuple[int, list[Skip]]:
    keys, skipped = [], []
    by_index = {u.index: u for u in units}
    try:
        encoded = EncodedUnits(encoder, units, batch_size, workers, reading)
        unreadable = []
        for batch, image in _in_input_order(encoded, units):
            failed = [s for s in batch.skipped if s.reason == UNREADABLE]
            unreadable += [f'{name_text(by_index[batch.unit].source)} ({s.detail})' for s in failed]
            skipped += [s for s in batch.skipped if s.reason != UNREADABLE]
            if image is not None:
                writer.append(image)
                keys += batch.keys
            progress.update(len(batch.keys) + len(batch.skipped))
        if unreadable:
            raise ToolError(f"{plural(len(unreadable), 'shard')} could not be read: {'; '.join(unreadable[:5])}"
                            f"{' ...' if len(unreadable) > 5 else ''}; nothing was written: run it again, or leave "
                            f"a shard out for good with {param('give_up', 'SHARD')}")
        if not keys:
            raise ToolError(f'no input could be decoded ({plural(len(skipped), "sample")} skipped)' if skipped
                            else 'nothing to embed')
        writer.commit(keys)
    finally:
        progress.close()
    return len(keys), skipped
