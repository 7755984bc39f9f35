"""The output folder of `embed --out DIR`: a small database of parts, one writer at a time.

Layout (the one clip-retrieval writes, so its tools and autofaiss read it): `img_emb/img_emb_N.npy`,
with --captions `text_emb/text_emb_N.npy`, and `metadata/metadata_N.parquet`, aligned row for row.
N = unit * 1000 + k (zero-padded, so name order is input order): part k of unit `unit`.

- `embed.json`: the settings that determine the rows; another model, part size, ... is refused.
- `units.jsonl`: the job's units and their sources (see `units.py`).
- `shards/UNIT.json`: written last for a unit, after every file of its parts is on disk: its rows,
  its skipped samples, and each part with its row count, the size of each of its files and the kinds
  of its metadata fields. A unit is done when this record exists and every part it names is intact.
- `ranks/RANK.json`: each rank's counts of the running job, gathered into the summary and removed.
- `summary.json`: totals, written at the end.

Every file is written with `durable.write_atomic`. `prepare` runs under the folder's lock before any
work: it checks the settings, lists the units, and keeps only what is sound: a done unit whose part
is missing, of another size or another row count is redone, and every file that no done unit names
(a killed attempt's parts, temporary files of writers that died) is removed.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import metadata
from .data import UNREADABLE, Skip
from .durable import remove_temporary_files, write_atomic, write_text
from .errors import UsageError
from .loader import Batch
from .units import Unit, plan_units

PARTS_PER_UNIT = 1000
FORMAT_VERSION = 2
SUBFOLDERS = ('img_emb', 'text_emb', 'metadata', 'shards')


@dataclass
class FolderSettings:
    """What determines the rows of an output folder (recorded in DIR/embed.json)."""

    model: str
    pretrained: str
    precision: str
    part_size: int
    batch_size: int
    captions: bool
    image_keys: list[str]
    caption_key: str
    format: int = FORMAT_VERSION


def rank_record(out: Path, rank: int) -> Path:
    """Where a rank of the running job records its counts (read for the summary, then removed)."""
    return out / 'ranks' / f'{rank:05d}.json'


def _record_path(out: Path, unit: int) -> Path:
    return out / 'shards' / f'{unit:06d}.json'


def read_records(out: Path) -> list[dict]:
    """The records of the done units, in unit order."""
    return [json.loads(p.read_text()) for p in sorted((out / 'shards').glob('[0-9]*.json'))]


def _rows_in(path: Path) -> int:
    if path.suffix == '.npy':
        return len(np.load(path, mmap_mode='r'))  # the header only: the rows are mapped, not read
    import pyarrow.parquet as pq
    return pq.read_metadata(path).num_rows


def _intact(out: Path, record: dict) -> bool:
    """Whether every file of every part of a unit's record is there, of its recorded size and row count."""
    try:
        return all((out / name).stat().st_size == size and _rows_in(out / name) == part['rows']
                   for part in record['parts'] for name, size in part['files'].items())
    except Exception:  # missing, unreadable, or not an array/table at all
        return False


def _check_settings(out: Path, settings: FolderSettings) -> None:
    recorded = out / 'embed.json'
    wanted = json.loads(json.dumps(settings.__dict__))
    if recorded.exists():
        found = json.loads(recorded.read_text())
        differ = [k for k in wanted if found.get(k) != wanted[k]]
        if differ:
            detail = '; '.join(f'{k}: {found.get(k)!r} there, {wanted[k]!r} now' for k in differ)
            raise UsageError(f'{out} holds the output of another embedding run ({detail}); '
                             f'use a new --out folder, or the same settings to resume')
    elif any((out / 'shards').iterdir()) or any((out / 'img_emb').iterdir()):
        raise UsageError(f'{out} holds parts but no embed.json: not an output folder of this tool')
    else:
        write_text(recorded, json.dumps(wanted, indent=2) + '\n')


def prepare(out: Path, settings: FolderSettings, inputs: Sequence[str], files_from: str | None) -> list[Unit]:
    """Check the folder and list the job's units (call while holding the folder's lock; see the module doc)."""
    for sub in SUBFOLDERS:
        (out / sub).mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    units = plan_units(out, inputs, files_from, settings.part_size)
    kept: set[str] = set()
    for path in sorted((out / 'shards').glob('[0-9]*.json')):
        try:
            record = json.loads(path.read_text())
        except ValueError:
            record = None
        if record is not None and _intact(out, record):
            kept.update(name for part in record['parts'] for name in part['files'])
        else:
            path.unlink()
    for sub in SUBFOLDERS[:3]:
        for path in (out / sub).iterdir():
            if f'{sub}/{path.name}' not in kept:
                path.unlink()
    for folder in (out, out / 'shards'):
        remove_temporary_files(folder)
    (out / 'ranks').mkdir(exist_ok=True)
    for stale in (out / 'ranks').iterdir():  # the counts of an earlier run that did not end
        stale.unlink()
    return units


def done_units(out: Path) -> frozenset[int]:
    return frozenset(r['unit'] for r in read_records(out))


@dataclass
class _UnitRows:
    source: str
    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # fixed columns of the rows not yet written
    json_fields: list[dict | None] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    parts: list[dict] = field(default_factory=list)
    total: int = 0


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, 'wb') as f:  # np.save given a path would add '.npy' to the temporary name
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    return write


class FolderWriter:
    """Writes the parts and unit records of one output folder, as batches of units arrive."""

    def __init__(self, out: Path, settings: FolderSettings, units: Sequence[Unit]):
        # pyarrow is imported, and its first table built (which imports pandas, when installed), here
        # rather than at the first part: a broken install fails before any work, and the time is not
        # taken from the model in the middle of the run
        import pyarrow as pa
        import pyarrow.parquet as pq
        self.write_table = pq.write_table
        self.fixed_types = {'image_path': pa.string()}
        if settings.captions:
            self.fixed_types.update(caption=pa.string(), similarity=pa.float64())
        metadata.part_table([dict(image_path='', caption='', similarity=0.0)], [None], self.fixed_types)
        self.out, self.part_size = out, settings.part_size
        self.sources = {u.index: u.source for u in units}
        self.units: dict[int, _UnitRows] = {}
        self.finished: list[dict] = []  # records of the units this writer completed
        self.unreadable: list[dict] = []  # units whose shard could not be read (not done)

    def add(self, batch: Batch, image: np.ndarray | None, text: np.ndarray | None) -> None:
        unit = self.units.setdefault(batch.unit, _UnitRows(self.sources[batch.unit]))
        unit.skipped += batch.skipped
        if image is not None:
            unit.image.append(image)
            if text is not None:
                unit.text.append(text)
                similarity = (image * text).sum(axis=1)
            for i, key in enumerate(batch.keys):
                row: dict[str, Any] = {'image_path': key}
                if text is not None:
                    row.update(caption=batch.captions[i], similarity=float(similarity[i]))
                unit.rows.append(row)
                unit.json_fields.append(batch.metas[i])
            unit.total += len(batch.keys)
        while len(unit.rows) >= self.part_size:
            self._write_part(batch.unit, unit, self.part_size)
        if batch.end:
            if unit.rows:
                self._write_part(batch.unit, unit, len(unit.rows))
            self._finish_unit(batch.unit, self.units.pop(batch.unit))

    def _write_part(self, index: int, unit: _UnitRows, rows: int) -> None:
        k = len(unit.parts)
        if k >= PARTS_PER_UNIT:
            raise UsageError(f'{unit.source} needs more than {PARTS_PER_UNIT} parts: raise --part-size')
        name = f'{index * PARTS_PER_UNIT + k:09d}'
        files: dict[str, int] = {}
        image = np.concatenate(unit.image)
        unit.image = [image[rows:]]
        files[f'img_emb/img_emb_{name}.npy'] = write_atomic(self.out / 'img_emb' / f'img_emb_{name}.npy',
                                                            _save_npy(image[:rows]))
        if unit.text:
            text = np.concatenate(unit.text)
            unit.text = [text[rows:]]
            files[f'text_emb/text_emb_{name}.npy'] = write_atomic(self.out / 'text_emb' / f'text_emb_{name}.npy',
                                                                  _save_npy(text[:rows]))
        table, kinds = metadata.part_table(unit.rows[:rows], unit.json_fields[:rows], self.fixed_types)
        unit.rows, unit.json_fields = unit.rows[rows:], unit.json_fields[rows:]
        meta = f'metadata/metadata_{name}.parquet'
        files[meta] = write_atomic(self.out / meta, lambda p: self.write_table(table, p))
        unit.parts.append(dict(name=name, rows=rows, files=files, columns=kinds))

    def _finish_unit(self, index: int, unit: _UnitRows) -> None:
        unreadable = next((s for s in unit.skipped if s.reason == UNREADABLE), None)
        if unreadable is not None:  # no record: its parts are removed and the unit redone by the next run
            self.unreadable.append(dict(unit=index, source=unit.source, detail=unreadable.detail))
            return
        record = dict(unit=index, source=unit.source, rows=unit.total, parts=unit.parts,
                      skipped=[dict(key=s.key, reason=s.reason, detail=s.detail) for s in unit.skipped])
        write_text(_record_path(self.out, index), json.dumps(record) + '\n')
        self.finished.append(record)


def _conform_metadata(out: Path, records: list[dict]) -> None:
    """Give every metadata part the folder's columns and types (see `metadata`), updating the records."""
    import pyarrow.parquet as pq
    target = metadata.folder_kinds(part['columns'] for r in records for part in r['parts'])
    for record in records:
        changed = False
        for part in record['parts']:
            if part['columns'] == target:
                continue
            name = f"metadata/metadata_{part['name']}.parquet"
            table = metadata.conform(pq.read_table(out / name), part['columns'], target)
            part['files'][name] = write_atomic(out / name, lambda p, t=table: pq.write_table(t, p))
            part['columns'] = dict(target)
            changed = True
        if changed:  # a crash before this line leaves a part of another size: the unit is redone
            write_text(_record_path(out, record['unit']), json.dumps(record) + '\n')


def finish_folder(out: Path, settings: FolderSettings, ranks: list[dict]) -> dict:
    """Conform the metadata parts and write DIR/summary.json: settings, totals, this run's counts per rank."""
    records = read_records(out)
    _conform_metadata(out, records)
    reasons: dict[str, int] = {}
    for record in records:
        for s in record['skipped']:
            reasons[s['reason']] = reasons.get(s['reason'], 0) + 1
    summary = dict(model=settings.model, pretrained=settings.pretrained, precision=settings.precision,
                   units=len(records), rows=sum(r['rows'] for r in records),
                   parts=sum(len(r['parts']) for r in records),
                   skipped=sum(len(r['skipped']) for r in records), skipped_by_reason=reasons, ranks=ranks)
    write_text(out / 'summary.json', json.dumps(summary, indent=2) + '\n')
    for record in (out / 'ranks').iterdir():
        record.unlink()
    return summary

