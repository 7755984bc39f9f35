"""Reading what `embed` embeds: image files, folders, file lists and webdataset tar shards, in units of work.

Inputs are streamed, never listed whole: folders are walked in path order, `--files-from` is read line
by line, and tar shards are read with the `webdataset` library. The work is cut into units, each
written as its own output part(s) and marked done as a whole, which is what makes a run resumable and
splittable across ranks and DataLoader workers:

- one tar shard is one unit;
- consecutive image files (from files, folders and lists, in the order given) are grouped into units
  of `part_size` files.

`UnitDataset` decodes and preprocesses in `torch.utils.data.DataLoader` workers and yields batches
that each belong to one unit, in the unit's order, followed by an end-of-unit record. A sample that
cannot be used (undecodable image, no image, a caption that is not text, bad json, a truncated tar)
is reported with its key and reason, never raised.
"""
from __future__ import annotations

import glob
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from braceexpand import braceexpand
from PIL import Image

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_KEY = 'txt'
_PATTERN_CHARS = set('{*?[')


class InputError(ValueError):
    """An input argument that names nothing readable."""


@dataclass(frozen=True)
class Unit:
    """A unit of work: one tar shard, or a run of image files."""

    index: int
    shard: str | None = None  # a tar shard's path
    files: tuple[str, ...] = ()  # or image files

    @property
    def source(self) -> str:
        return self.shard if self.shard is not None else (self.files[0] if self.files else '')


def _walk(folder: Path) -> Iterator[Path]:
    """Image files under `folder`, in the order of their full path strings, without listing it all."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            is_dir = entry.is_dir()
            entries.append((entry.name + ('/' if is_dir else ''), entry.path, is_dir))
    for _, path, is_dir in sorted(entries):
        if is_dir:
            yield from _walk(Path(path))
        elif Path(path).suffix.lower() in IMAGE_SUFFIXES:
            yield Path(path)


def expand_pattern(pattern: str) -> list[str]:
    """Paths a brace pattern (`data/{00000..00099}.tar`) and/or glob names, in the pattern's order."""
    found: list[str] = []
    for expanded in braceexpand(pattern):
        found.extend(sorted(glob.glob(expanded)) if set(expanded) & set('*?[') else [expanded])
    return found


def input_items(inputs: Sequence[str], files_from: str | None) -> Iterator[tuple[str, str]]:
    """('tar', shard) or ('file', image path) for every input, in the order given."""
    for arg in inputs:
        path = Path(arg)
        if path.is_dir():
            yield from (('file', str(p)) for p in _walk(path))
        elif path.is_file():
            yield ('tar' if path.suffix == '.tar' else 'file', str(path))
        elif set(arg) & _PATTERN_CHARS:
            matches = expand_pattern(arg)
            missing = [m for m in matches if not os.path.isfile(m)]
            if not matches or missing:
                raise InputError(f'{arg}: matches no file' if not matches else f'{missing[0]}: no such file')
            yield from (('tar' if m.endswith('.tar') else 'file', m) for m in matches)
        else:
            raise InputError(f'{arg}: no such file or folder')
    if files_from:
        with open(files_from, encoding='utf-8') as lines:
            for line in lines:
                if line.strip():
                    yield ('file', line.rstrip('\n'))


def iter_units(inputs: Sequence[str], files_from: str | None, part_size: int) -> Iterator[Unit]:
    """The units of work of the inputs, numbered from 0 in input order."""
    index, run = 0, []
    for kind, path in input_items(inputs, files_from):
        if kind == 'file':
            run.append(path)
            if len(run) == part_size:
                yield Unit(index, files=tuple(run))
                index, run = index + 1, []
            continue
        if run:
            yield Unit(index, files=tuple(run))
            index, run = index + 1, []
        yield Unit(index, shard=path)
        index += 1
    if run:
        yield Unit(index, files=tuple(run))


@dataclass
class Sample:
    key: str  # the file's path, or the webdataset __key__
    image: Any  # a path or the image file's bytes
    caption: Any = None  # bytes or str, when captions are read
    meta: dict | None = None


@dataclass
class Skipped:
    key: str | None
    reason: str


def _tar_samples(shard: str, image_keys: Sequence[str], caption_key: str | None) -> Iterator[Sample | Skipped]:
    from webdataset.tariterators import group_by_keys, tar_file_expander
    errors: list[Exception] = []

    def handler(exn: Exception) -> bool:
        errors.append(exn)
        return False  # a damaged tar cannot be read past the damage: stop this shard

    with open(shard, 'rb') as stream:
        members = tar_file_expander(iter([{'url': shard, 'stream': stream}]), handler=handler)
        last = None
        for sample in _grouped(group_by_keys(members, handler=handler), image_keys, caption_key):
            if last is not None:
                yield last
            last = sample
    damaged = [f'{type(e).__name__}: {str(e)[:200]}' for e in errors]
    if not _has_end_marker(shard):
        damaged.append('no end-of-archive marker (truncated?)')
    if damaged and isinstance(last, Sample):  # the last sample may have lost members to the damage
        last = Skipped(last.key, 'damaged tar: the sample before the damage may be incomplete')
    if last is not None:
        yield last
    for reason in damaged:
        yield Skipped(None, f'damaged tar: {reason}')


def _has_end_marker(shard: str) -> bool:
    """Whether a tar file ends as every complete tar does: whole 512-byte blocks, the last two zero."""
    size = os.path.getsize(shard)
    if size < 1024 or size % 512:
        return False
    with open(shard, 'rb') as f:
        f.seek(size - 1024)
        return not any(f.read(1024))


def _grouped(samples: Iterator[dict], image_keys: Sequence[str], caption_key: str | None) -> Iterator[Sample | Skipped]:
    """Samples from webdataset's grouped tar members (`__key__`, then one entry per file extension)."""
    for raw in samples:
        key = raw.get('__key__')
        image = next((raw[k] for k in image_keys if k in raw), None)
        if image is None:
            yield Skipped(key, 'no image (' + '/'.join(image_keys) + ')')
            continue
        meta = None
        if 'json' in raw:
            try:
                meta = json.loads(raw['json'])
                if not isinstance(meta, dict):
                    raise ValueError('not an object')
            except ValueError as e:
                yield Skipped(key, f'json is not a JSON object ({str(e)[:80]})')
                continue
        yield Sample(key, image, raw.get(caption_key) if caption_key else None, meta)


def unit_samples(unit: Unit, image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None) -> Iterator[Sample | Skipped]:
    """The samples of a unit, in order; a file unit has no captions."""
    if unit.shard is None:
        yield from (Sample(path, path) for path in unit.files)
    else:
        yield from _tar_samples(unit.shard, image_keys, caption_key)


def open_image(source: Any) -> Image.Image:
    """The decoded image of a path or of an image file's bytes (raises on failure)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.copy()


def caption_text(caption: Any) -> str:
    """The caption as text (raises ValueError when it is missing or not UTF-8 text)."""
    if caption is None:
        raise ValueError('no caption')
    if isinstance(caption, bytes):
        try:
            caption = caption.decode('utf-8')
        except UnicodeDecodeError:
            raise ValueError('caption is not UTF-8 text') from None
    return caption.strip()


class UnitDataset(torch.utils.data.IterableDataset):
    """Batches of preprocessed images of the units that this rank and DataLoader worker own.

    Each item is a dict for one unit: `pixels` (a tensor, or None), `keys`, `captions`, `metas` and
    `skipped` (list of (key, reason)) for at most `batch_size` samples, with `end` True on the unit's
    last item (which may hold no samples), and `decode_s`, the CPU time its decoding took. Units in
    `done` are passed over.
    """

    def __init__(self, units: Callable[[], Iterator[Unit]], preprocess: Callable, batch_size: int,
                 rank: int = 0, world_size: int = 1, done: frozenset[int] = frozenset(),
                 image_keys: Sequence[str] = IMAGE_KEYS, caption_key: str | None = None,
                 tokenizer: Callable | None = None):
        self.units, self.preprocess, self.batch_size = units, preprocess, batch_size
        self.rank, self.world_size, self.done = rank, world_size, done
        self.image_keys, self.caption_key, self.tokenizer = tuple(image_keys), caption_key, tokenizer

    def owned_units(self) -> Iterator[Unit]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info else (1, 0)
        for unit in self.units():
            if unit.index % self.world_size != self.rank or unit.index in self.done:
                continue
            if unit.index // self.world_size % workers == worker:
                yield unit

    def _batch(self, unit: Unit, samples: list, skipped: list, end: bool, started: float) -> dict:
        pixels = torch.stack([p for _, p, _, _ in samples]) if samples else None
        captions = [c for _, _, c, _ in samples] if self.caption_key else None
        tokens = self.tokenizer(captions) if self.tokenizer is not None and captions else None
        return dict(unit=unit.index, source=unit.source, pixels=pixels, tokens=tokens,
                    keys=[k for k, _, _, _ in samples], captions=captions, metas=[m for _, _, _, m in samples],
                    skipped=list(skipped), end=end, decode_s=time.thread_time() - started)

    def __iter__(self) -> Iterator[dict]:
        started = time.thread_time()  # this thread's CPU time, restarted after each batch is taken
        for unit in self.owned_units():
            samples: list = []
            skipped: list = []
            for item in unit_samples(unit, self.image_keys, self.caption_key):
                if isinstance(item, Skipped):
                    skipped.append((item.key, item.reason))
                    continue
                try:
                    caption = caption_text(item.caption) if self.caption_key else None
                except ValueError as e:
                    skipped.append((item.key, str(e)))
                    continue
                try:
                    pixels = self.preprocess(open_image(item.image))
                except Exception as e:  # PIL raises many types for damaged or non-image data
                    skipped.append((item.key, f'undecodable image ({type(e).__name__})'))
                    continue
                samples.append((item.key, pixels, caption, item.meta))
                if len(samples) == self.batch_size:
                    yield self._batch(unit, samples, skipped, end=False, started=started)
                    samples, skipped, started = [], [], time.thread_time()
            yield self._batch(unit, samples, skipped, end=True, started=started)
            started = time.thread_time()
