"""`embed --out FILE.npy` (small jobs): the images or text lines of the inputs, encoded in input order into one
array, row i for line i of FILE.paths.txt (written by `store.npy_file`, whole or not at all)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterator, Sequence

from eva_open_clip.embed.decode import PixelLimits
from eva_open_clip.embed.defaults import IMAGE_KEYS
from eva_open_clip.embed.encoder import Encoder
from eva_open_clip.embed.inputs import InputError
from eva_open_clip.embed.loader import Batch, DecodedBatches, UnitDataset
from eva_open_clip.embed.pixels import Pixels
from eva_open_clip.embed.progress import Progress, plural
from eva_open_clip.embed.skips import Skip
from eva_open_clip.embed.store.npy_file import NpyWriter, npy_output
from eva_open_clip.embed.units import list_units
from eva_open_clip.errors import ToolError, UsageError, param


def embed_to_npy(load_encoder: Callable[[], Encoder], inputs: Sequence[str], out: str | os.PathLike,
                 batch_size: int = 32, text_file: str | None = None, files_from: str | None = None, workers: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS, limits: PixelLimits | None = None,
                 quiet: bool = False, progress_interval: float | None = None,
                 decode: str = 'exact') -> tuple[int, list[Skip]]:
    """Write FILE.npy and FILE.paths.txt; return the number of rows and the samples skipped.

    The inputs are listed (or the text file read) before `load_encoder` is called, so that a mistake in
    them is found before the model is loaded.
    """
    with npy_output(out) as writer:
        if text_file:
            lines = _text_lines(text_file)
            if not lines:
                raise UsageError(f"{param('text_file', text_file)}: holds no line of text")
            progress = Progress(len(lines), 'text', interval=progress_interval, enabled=not quiet)
            return _embed_lines(load_encoder(), lines, writer, batch_size, progress)
        units, duplicates = list_units(inputs, files_from, 10_000)
        if duplicates.note():
            print(duplicates.note(), file=sys.stderr)
        progress = Progress(sum(len(u.files) for u in units) or None, 'image', interval=progress_interval,
                            enabled=not quiet)
        return _embed_images(load_encoder(), units, writer, batch_size, workers, image_keys, limits, progress,
                             decode)


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


def _in_input_order(batches: DecodedBatches) -> Iterator[Batch]:
    """The batches of units in unit order: units arrive interleaved from the workers."""
    pending: dict[int, list[Batch]] = {}
    following = 0
    for batch in batches:
        pending.setdefault(batch.unit, []).append(batch)
        while pending.get(following) and pending[following][-1].end:
            yield from pending.pop(following)
            following += 1


def _embed_images(encoder: Encoder, units: list, writer: NpyWriter, batch_size: int, workers: int,
                  image_keys: Sequence[str], limits: PixelLimits | None, progress: Progress,
                  decode: str) -> tuple[int, list[Skip]]:
    keys, skipped = [], []
    try:
        dataset = UnitDataset(units, Pixels(encoder.preprocess, decode), batch_size, image_keys=image_keys,
                              limits=limits)
        decoding = DecodedBatches(dataset, min(workers, len(units)), encoder.device_type)
        for batch, image, _ in encoder.encoded(_in_input_order(decoding)):
            skipped += batch.skipped
            if image is not None:
                writer.append(image)
                keys += batch.keys
            progress.update(len(batch.keys) + len(batch.skipped))
        if not keys:
            raise ToolError(f'no input could be decoded ({plural(len(skipped), "sample")} skipped)' if skipped
                            else 'nothing to embed')
        writer.commit(keys)
    finally:
        progress.close()
    return len(keys), skipped
