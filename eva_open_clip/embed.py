"""`eva-open-clip embed`: L2-normalized float32 features of many images (or lines of text).

Two outputs:

- `--out FILE.npy` (small jobs): one array, row i for line i of FILE.paths.txt, written under
  temporary names and renamed at the end.
- `--out DIR` (large jobs), the layout clip-retrieval writes and its tools and autofaiss read:
  `img_emb/img_emb_N.npy`, with `--captions` also `text_emb/text_emb_N.npy`, and
  `metadata/metadata_N.parquet` (`image_path`, `caption`, the sample's json fields, `similarity`),
  aligned row for row. N = unit * 1000 + k (zero-padded, so name order is input order): part k of
  input unit `unit` (a tar shard, or a run of --part-size files). Each file of a part is written under a
  temporary name and renamed; `shards/UNIT.json` (rows, parts, skipped samples and why) is written
  last and marks the unit done. A run started again with the same command skips done units and redoes
  the others, so it ends with exactly what an uninterrupted run writes; `embed.json` records the
  settings, and a different model, input, part size or batch size is refused.

Decoding runs in DataLoader workers (see `data.UnitDataset` and `DecodedBatches`). Under torchrun each rank takes every
WORLD_SIZE-th unit, so its parts are the single-process ones; rank 0 writes `summary.json`.
"""
from __future__ import annotations

import functools
import itertools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from numpy.lib import format as npy_format
from tqdm import tqdm

from .data import IMAGE_KEYS, InputError, UnitDataset, iter_units
from .inference import Encoder, ToolError

PARTS_PER_UNIT = 1000
_WORKER_START = 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() else 'spawn'
FORMAT_VERSION = 1


def paths_file(out: Path) -> Path:
    """FILE.paths.txt beside FILE.npy."""
    return out.with_name(out.name[:-len('.npy')] + '.paths.txt' if out.name.endswith('.npy') else out.name + '.paths.txt')


def default_workers(local_world_size: int = 1) -> int:
    """DataLoader workers per rank: the cores this process may use, shared among the ranks on the node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size))


class DecodedBatches:
    """The dataset's batches through a DataLoader with `workers` decoding processes, timing the waits.

    `waited` is how long the consumer waited for decoded batches after the first one (which includes the
    workers' start-up): near zero when the model is the bottleneck, and the cue to raise --workers when
    not. Workers are started by a fork server rather than forked from this process, which holds the model
    (a fork would share its pages copy-on-write and make the model's memory writes fault); under torchrun
    they are plain forks, as a fork server hung there with torch 2.1.

    On the CPU, the model and the decoding workers share the cores. When decoding an image costs more
    CPU time than encoding it (a small model), the model's torch threads are reduced by the number of
    workers after the first few batches: left as they are, they contend with the workers for the
    cores, and each of the model's parallel steps waits for a thread the workers displaced (a tiny
    model's batch took up to 270 ms so, instead of 3). The workers report their decoding time with each
    batch; the model's need is the least CPU time per image this process spent on a batch, as
    contention only ever adds to it.
    """

    DECIDE_AFTER = 4  # batches measured before the threads are settled (the first one is not measured)

    def __init__(self, dataset: UnitDataset, workers: int, device_type: str):
        self.dataset, self.workers, self.device_type = dataset, workers, device_type
        self.waited = 0.0
        self.decode_cpu, self.decoded, self.model_cpu_per_image = 0.0, 0, float('inf')

    def __iter__(self) -> Iterator[dict]:
        start = 'fork' if int(os.environ.get('WORLD_SIZE', 1)) > 1 else _WORKER_START
        extra = dict(prefetch_factor=4, multiprocessing_context=start) if self.workers else {}
        data = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                                pin_memory=self.device_type == 'cuda', **extra))
        for seen in itertools.count():
            asked = time.perf_counter()
            batch = next(data, None)
            if batch is None:
                return
            received, cpu = time.perf_counter(), time.process_time()
            yield batch
            if seen:  # the first batch includes the workers' start-up
                self.waited += received - asked
                if batch['keys']:
                    self.decode_cpu += batch['decode_s']
                    self.decoded += len(batch['keys'])
                    used = (time.process_time() - cpu) / len(batch['keys'])
                    self.model_cpu_per_image = min(self.model_cpu_per_image, used)
            if seen == self.DECIDE_AFTER:
                self._settle_threads()

    def _settle_threads(self) -> None:
        if self.device_type == 'cpu' and self.workers and self.decoded and \
                self.decode_cpu / self.decoded > self.model_cpu_per_image:
            torch.set_num_threads(max(1, torch.get_num_threads() - self.workers))


def _progress(rank: int, unit: str) -> tqdm:
    return tqdm(unit=unit, file=sys.stderr, disable=rank != 0, smoothing=0.1)


def _warn_skipped(skipped: Sequence[tuple[str | None, str]]) -> None:
    if skipped:
        shown = ', '.join(f'{key or "?"} ({reason})' for key, reason in skipped[:20])
        more = f' and {len(skipped) - 20} more' if len(skipped) > 20 else ''
        print(f'warning: skipped {len(skipped)} sample(s): {shown}{more}', file=sys.stderr)


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


def _text_rows(encoder: Encoder, text_file: str, batch_size: int) -> Iterable[tuple[list[str], np.ndarray]]:
    lines = [line for line in Path(text_file).read_text(encoding='utf-8').splitlines() if line.strip()]
    if not lines:
        raise ToolError('nothing to embed')
    with _progress(0, 'text') as progress:
        for start in range(0, len(lines), batch_size):
            chunk = lines[start:start + batch_size]
            yield chunk, encoder.texts(chunk).numpy()
            progress.update(len(chunk))


def _image_rows(encoder: Encoder, inputs: Sequence[str], files_from: str | None, batch_size: int, workers: int,
                image_keys: Sequence[str], skipped: list) -> Iterable[tuple[list[str], np.ndarray]]:
    """(keys, features) in input order: units arrive interleaved from the workers and leave in order."""
    dataset = UnitDataset(functools.partial(iter_units, inputs, files_from, 10_000), encoder.preprocess, batch_size,
                          image_keys=image_keys)
    pending: dict[int, list] = {}
    ended: set[int] = set()
    following = 0
    with _progress(0, 'img') as progress:
        for batch in DecodedBatches(dataset, workers, encoder.device_type):
            rows = pending.setdefault(batch['unit'], [])
            skipped.extend(batch['skipped'])
            if batch['pixels'] is not None:
                rows.append((batch['keys'], encoder.encode_pixels(batch['pixels']).numpy()))
            progress.update(len(batch['keys']) + len(batch['skipped']))
            if batch['end']:
                ended.add(batch['unit'])
            while following in ended:
                yield from pending.pop(following, [])
                ended.discard(following)
                following += 1


def embed(encoder: Encoder, inputs: Sequence[str], out: str | os.PathLike, batch_size: int = 32,
          text_file: str | None = None, files_from: str | None = None, workers: int = 0,
          image_keys: Sequence[str] = IMAGE_KEYS) -> int:
    """Write FILE.npy and FILE.paths.txt; return the number of rows. Unusable samples are skipped."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    skipped: list = []
    writer = _RowWriter(out.parent)
    kept: list[str] = []
    staged: list[Path] = []
    try:
        try:
            rows = (_text_rows(encoder, text_file, batch_size) if text_file else
                    _image_rows(encoder, inputs, files_from, batch_size, workers, image_keys, skipped))
            for keys, features in rows:
                writer.write(features)
                kept += keys
        except InputError as e:
            raise ToolError(str(e)) from None
        if not kept:
            raise ToolError('no input could be decoded' if skipped else 'nothing to embed')
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
    _warn_skipped(skipped)
    return len(kept)


@dataclass
class FolderSettings:
    """What determines the content of an output folder (recorded in DIR/embed.json)."""

    model: str
    pretrained: str
    precision: str
    inputs: list[str]
    files_from: str | None
    part_size: int
    batch_size: int
    captions: bool
    image_keys: list[str]
    caption_key: str
    format: int = FORMAT_VERSION


@dataclass
class _UnitRows:
    source: str
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[tuple[str | None, str]] = field(default_factory=list)
    parts: list[str] = field(default_factory=list)
    rows: int = 0


def _write_tmp(path: Path, write: Callable[[Path], None]) -> Path:
    """Write what belongs at `path` to `.NAME.tmp` beside it; return that temporary path."""
    tmp = path.with_name(f'.{path.name}.tmp')
    write(tmp)
    return tmp


def _metadata_table(rows: list[dict[str, Any]]):
    import pyarrow as pa
    try:
        return pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        # json fields whose values differ in type between samples: keep them as JSON text
        fixed = {'image_path', 'caption', 'similarity'}
        return pa.Table.from_pylist([{k: v if k in fixed or v is None else json.dumps(v) for k, v in r.items()}
                                     for r in rows])


class FolderWriter:
    """Writes the parts and unit records of one output folder (see the module docstring)."""

    def __init__(self, out: Path, settings: FolderSettings, part_size: int):
        # pyarrow is imported, and its first table built (which imports pandas, when installed), here
        # rather than at the first part: a broken install fails before any work, and the time is not
        # taken from the model in the middle of the run
        import pyarrow.parquet as pq
        _metadata_table([dict(image_path='')])
        self.write_table = pq.write_table
        self.out, self.settings, self.part_size = out, settings, part_size
        self.units: dict[int, _UnitRows] = {}
        self.finished: list[dict] = []  # records of the units this writer completed

    @staticmethod
    def done_units(out: Path) -> frozenset[int]:
        return frozenset(int(p.stem) for p in (out / 'shards').glob('*.json'))

    @staticmethod
    def prepare(out: Path, settings: FolderSettings) -> None:
        """Check or record the settings and clear the temporary files of a killed run."""
        for sub in ('img_emb', 'text_emb', 'metadata', 'shards'):
            (out / sub).mkdir(parents=True, exist_ok=True)
            for leftover in (out / sub).glob('.*.tmp'):
                leftover.unlink()
        recorded = out / 'embed.json'
        wanted = json.loads(json.dumps(settings.__dict__))
        if recorded.exists():
            found = json.loads(recorded.read_text())
            differ = [k for k in wanted if found.get(k) != wanted[k]]
            if differ:
                detail = '; '.join(f'{k}: {found.get(k)!r} there, {wanted[k]!r} now' for k in differ)
                raise ToolError(f'{out} holds the output of another embedding run ({detail}); '
                                f'use a new --out folder, or the same settings to resume')
        elif any((out / 'shards').iterdir()) or any((out / 'img_emb').iterdir()):
            raise ToolError(f'{out} holds parts but no embed.json: not an output folder of this tool')
        else:
            os.replace(_write_tmp(recorded, lambda p: p.write_text(json.dumps(wanted, indent=2) + '\n')), recorded)

    def add(self, batch: dict, image: np.ndarray | None, text: np.ndarray | None) -> None:
        unit = self.units.setdefault(batch['unit'], _UnitRows(batch['source']))
        unit.skipped += batch['skipped']
        if image is not None:
            unit.image.append(image)
            similarity = (image * text).sum(axis=1) if text is not None else None
            if text is not None:
                unit.text.append(text)
            for i, key in enumerate(batch['keys']):
                row: dict[str, Any] = {'image_path': key}
                if batch['captions'] is not None:
                    row['caption'] = batch['captions'][i]
                meta = batch['metas'][i] or {}
                row.update({k: v for k, v in meta.items() if k not in ('image_path', 'caption', 'similarity')})
                if similarity is not None:
                    row['similarity'] = float(similarity[i])
                unit.meta.append(row)
            unit.rows += len(batch['keys'])
        while len(unit.meta) >= self.part_size:  # unit.meta holds the rows not yet written
            self._write_part(batch['unit'], unit, self.part_size)
        if batch['end']:
            if unit.meta:
                self._write_part(batch['unit'], unit, len(unit.meta))
            self._finish_unit(batch['unit'], self.units.pop(batch['unit']))

    def _write_part(self, index: int, unit: _UnitRows, rows: int) -> None:
        k = len(unit.parts)
        if k >= PARTS_PER_UNIT:
            raise ToolError(f'{unit.source} needs more than {PARTS_PER_UNIT} parts: raise --part-size')
        name = f'{index * PARTS_PER_UNIT + k:09d}'
        image = np.concatenate(unit.image)
        unit.image = [image[rows:]]
        outputs: list[tuple[Path, Callable[[Path], None]]] = [
            (self.out / 'img_emb' / f'img_emb_{name}.npy', lambda p, a=image[:rows]: _save_npy(p, a))]
        if unit.text:
            text = np.concatenate(unit.text)
            unit.text = [text[rows:]]
            outputs.append((self.out / 'text_emb' / f'text_emb_{name}.npy', lambda p, a=text[:rows]: _save_npy(p, a)))
        meta, unit.meta = unit.meta[:rows], unit.meta[rows:]
        outputs.append((self.out / 'metadata' / f'metadata_{name}.parquet',
                        lambda p: self.write_table(_metadata_table(meta), p)))
        staged = [(path, _write_tmp(path, write)) for path, write in outputs]
        for path, tmp in staged:
            os.replace(tmp, path)
        unit.parts.append(name)

    def _finish_unit(self, index: int, unit: _UnitRows) -> None:
        record = dict(unit=index, source=unit.source, rows=unit.rows, parts=unit.parts,
                      skipped=[dict(key=k, reason=r) for k, r in unit.skipped])
        path = self.out / 'shards' / f'{index:06d}.json'
        os.replace(_write_tmp(path, lambda p: p.write_text(json.dumps(record) + '\n')), path)
        self.finished.append(record)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, 'wb') as f:
        np.save(f, np.ascontiguousarray(array, dtype=np.float32))


def embed_folder(encoder: Encoder, settings: FolderSettings, out: Path, workers: int, rank: int = 0,
                 world_size: int = 1, barrier: Callable[[], None] = lambda: None) -> dict:
    """Embed into the folder layout; return this rank's counts (units, rows, skipped) and timings.

    `seconds` and `images_per_s` run from the end of the first batch (loading and start-up excluded);
    `input_wait_s` is the part of that time spent waiting for decoded images.
    """
    if rank == 0:
        FolderWriter.prepare(out, settings)
    barrier()  # the other ranks start once rank 0 has checked the folder and cleared leftovers
    done = FolderWriter.done_units(out)
    writer = FolderWriter(out, settings, settings.part_size)
    caption_key = settings.caption_key if settings.captions else None
    dataset = UnitDataset(functools.partial(iter_units, settings.inputs, settings.files_from, settings.part_size),
                          encoder.preprocess, settings.batch_size, rank=rank, world_size=world_size, done=done,
                          image_keys=settings.image_keys, caption_key=caption_key,
                          tokenizer=encoder.tokenizer if settings.captions else None)
    first = None  # when the first batch was done: the rate excludes loading and start-up
    first_rows = 0
    batches = DecodedBatches(dataset, workers, encoder.device_type)
    try:
        with _progress(rank, 'img') as progress:
            for batch in batches:
                image = text = None
                if batch['pixels'] is not None:
                    image = encoder.encode_pixels(batch['pixels']).numpy()
                    if batch['tokens'] is not None:
                        text = encoder.encode_tokens(batch['tokens']).numpy()
                writer.add(batch, image, text)
                progress.update(len(batch['keys']) + len(batch['skipped']))
                if first is None and batch['keys']:
                    first, first_rows = time.perf_counter(), len(batch['keys'])
    except InputError as e:
        raise ToolError(str(e)) from None
    rows = sum(r['rows'] for r in writer.finished)
    seconds = time.perf_counter() - first if first is not None else 0.0
    return dict(rank=rank, units=len(writer.finished), rows=rows,
                skipped=sum(len(r['skipped']) for r in writer.finished), seconds=seconds,
                images_per_s=(rows - first_rows) / seconds if seconds > 0 else None,
                input_wait_s=batches.waited)


def write_summary(out: Path, settings: FolderSettings, ranks: list[dict]) -> dict:
    """DIR/summary.json: settings, totals over every done unit, this run's counts per rank."""
    records = [json.loads(p.read_text()) for p in sorted((out / 'shards').glob('*.json'))]
    reasons: dict[str, int] = {}
    for record in records:
        for s in record['skipped']:
            reason = s['reason'].split(' (')[0].split(':')[0]
            reasons[reason] = reasons.get(reason, 0) + 1
    summary = dict(model=settings.model, pretrained=settings.pretrained, precision=settings.precision,
                   units=len(records), rows=sum(r['rows'] for r in records),
                   parts=sum(len(r['parts']) for r in records),
                   skipped=sum(len(r['skipped']) for r in records), skipped_by_reason=reasons, ranks=ranks)
    path = out / 'summary.json'
    os.replace(_write_tmp(path, lambda p: p.write_text(json.dumps(summary, indent=2) + '\n')), path)
    return summary
