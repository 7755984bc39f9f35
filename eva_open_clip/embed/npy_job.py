"""`embed --out FILE.npy` (small jobs): the images or text lines of the inputs, encoded in input order into one
array, row i for line i of FILE.paths.txt (written by `store.npy_file`, whole or not at all)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from eva_open_clip.embed.decode import PixelLimits
from eva_open_clip.embed.defaults import IMAGE_KEYS
from eva_open_clip.embed.encoder import Encoder
from eva_open_clip.embed.inputs import InputError, named_identities
from eva_open_clip.embed.loader import Batch, DecodedBatches, UnitDataset
from eva_open_clip.embed.pixels import Pixels
from eva_open_clip.embed.progress import Progress, plural
from eva_open_clip.embed.remote import RemoteOptions
from eva_open_clip.embed.skips import UNREADABLE, Skip
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.store.npy_file import NpyWriter, npy_output
from eva_open_clip.embed.units import Unit, list_units
from eva_open_clip.errors import ToolError, UsageError, param


def embed_to_npy(load_encoder: Callable[[], Encoder], inputs: Sequence[str], out: str | os.PathLike,
                 batch_size: int = 32, text_file: str | None = None, files_from: str | None = None, workers: int = 0,
                 image_keys: Sequence[str] = IMAGE_KEYS, limits: PixelLimits | None = None,
                 quiet: bool = False, progress_interval: float | None = None, decode: str = 'exact',
                 remote: RemoteOptions = RemoteOptions(), give_up: Sequence[str] = ()) -> tuple[int, list[Skip]]:
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
        units = _without(units, give_up)
        for note in listing.notes():
            print(note, file=sys.stderr)
        progress = Progress(sum(len(u.files) for u in units) or None, 'image', interval=progress_interval,
                            enabled=not quiet)
        return _embed_images(load_encoder(), units, writer, batch_size, workers, image_keys, limits, progress,
                             decode, remote)


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


def _without(units: list[Unit], give_up: Sequence[str]) -> list[Unit]:
    """The units less the shards given up on (each named must be one of them)."""
    named = {identity: arg for arg in give_up for identity in named_identities(arg)}
    shards = {s.real for unit in units if unit.shard is not None for s in unit.sources}
    for identity, arg in named.items():
        if identity not in shards:
            raise UsageError(f"{param('give_up', arg)}: no shard of the inputs is {identity}")
    return [u for u in units if not (u.shard is not None and u.sources[0].real in named)]


def _in_input_order(batches: Iterable[Batch]) -> Iterator[Batch]:
    """The batches of units in unit order: units arrive interleaved from the workers; a unit read again from its
    start (`restart`) forgets what it gave before."""
    pending: dict[int, list[Batch]] = {}
    following = 0
    for batch in batches:
        if batch.restart:
            pending.pop(batch.unit, None)
            continue
        pending.setdefault(batch.unit, []).append(batch)
        while pending.get(following) and pending[following][-1].end:
            yield from pending.pop(following)
            following += 1


def _embed_images(encoder: Encoder, units: list, writer: NpyWriter, batch_size: int, workers: int,
                  image_keys: Sequence[str], limits: PixelLimits | None, progress: Progress,
                  decode: str, remote: RemoteOptions) -> tuple[int, list[Skip]]:
    keys, skipped = [], []
    by_index = {u.index: u for u in units}
    try:
        dataset = UnitDataset(units, Pixels(encoder.preprocess, decode), batch_size, image_keys=image_keys,
                              limits=limits, remote=remote)
        decoding = DecodedBatches(dataset, min(workers, len(units)), encoder.device_type, quiet_s=remote.quiet_s())
        unreadable = []
        for batch, image, _ in encoder.encoded(_in_input_order(decoding)):
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
