"""The output folder of `embed --out DIR`: a small database of parts, one writer at a time.

Layout (the one clip-retrieval writes, so its tools and autofaiss read it): `img_emb/img_emb_N.npy`,
with --captions `text_emb/text_emb_N.npy`, and `metadata/metadata_N.parquet`, aligned row for row.
N is part k of unit `unit`: `part_name(unit, k)`, nine digits for the first 999999 units and 999
parts of a unit (UNIT000, UNIT001, ...), longer past that, so that name order is always input order
and a unit may have any number of parts.

- `shards/UNIT.json`: written last for a unit, after every file of its parts is on disk: its sources
  (with their identity), the settings it was made with, its rows, its skipped samples, and each part
  with its row count, the size of each of its files and the kinds of its metadata fields. A unit is
  done when this record is sound and every part it names is intact. The done records are the truth
  of the folder: the other files can be rebuilt from them.
- `embed.json`: the settings that determine the rows. The first finished unit fixes them: while no
  unit is done, a run with other settings takes the folder over; after that another model, part
  size, ... is refused. A damaged or missing `embed.json` is rebuilt from the done records.
- `units.jsonl`: the job's units and their sources (see `units.py`).
- `ranks/RANK.json`: each rank's counts of the running job, gathered into the summary and removed.
- `summary.json`: totals, written at the end.

Every file is written with `durable.write_atomic`. `check_folder` refuses, before anything is written,
a folder that is neither new, empty nor an output folder of this tool. `prepare` runs under the
folder's lock before any work: it checks the settings, lists the units, and keeps only what is sound:
a done unit whose part is missing, of another size or another row count is redone, and the files of
this tool that no done unit names (a killed attempt's parts, temporary files of writers that died)
are removed. Only files with this tool's names are ever removed; anything else in the folder is
left as it is.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from eva_open_clip.durable import remove_temporary_files, temporary_target, write_atomic, write_text
from eva_open_clip.embed.store import metadata
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.store.paths import (
    PART_FOLDERS,
    RANKS,
    RECORD_NAME,
    RECORDS,
    SETTINGS_FILE,
    SUBFOLDERS,
    SUMMARY_FILE,
    TOP_FILES,
    part_name,
    record_path,
)
from eva_open_clip.embed.store.records import Part, RankCounts, SkipRecord, Summary, UnitRecord
from eva_open_clip.embed.store.unit_list import read_unit_list
from eva_open_clip.errors import UsageError, param

FORMAT_VERSION = 3
# settings added since format 3 began, with the value that the folders written before them were made with
IMPLIED = {'decode': 'exact', 'quantize': 'none'}


class FolderSettings:
    """What determines the rows of an output folder (recorded in DIR/embed.json and in every done record): the
    job's options that say so (`embed.options`: model, weights, precision, decoding, ...; this store reads
    `model`, `pretrained`, `precision`, `part_size` and `captions`), and the folder's format.

    The batch size is not among them (a run after an out-of-memory failure may take a smaller one): each
    unit's record says which it was made with.
    """

    def __init__(self, values: Mapping[str, Any]):
        self._values = json.loads(json.dumps({**values, 'format': FORMAT_VERSION}))

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__['_values'][name]
        except KeyError:
            raise AttributeError(name) from None

    def as_json(self) -> dict:
        return json.loads(json.dumps(self._values))


def _read_record(path: Path) -> UnitRecord | None:
    """A unit's record, or None when it is not a sound record of this tool (of this format)."""
    try:
        record = UnitRecord.from_json(json.loads(path.read_text(encoding='utf-8')))
        if path != record_path(path.parent.parent, record.unit) or record.settings.get('format') != FORMAT_VERSION:
            return None
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _record_paths(out: Path) -> list[Path]:
    folder = out / RECORDS
    return sorted(p for p in folder.iterdir() if RECORD_NAME.fullmatch(p.name)) if folder.is_dir() else []


def read_records(out: Path) -> list[UnitRecord]:
    """The sound records of the done units, in unit order."""
    return [r for r in map(_read_record, _record_paths(out)) if r is not None]


def _rows_in(path: Path) -> int:
    if path.suffix == '.npy':
        return len(np.load(path, mmap_mode='r'))  # the header only: the rows are mapped, not read
    import pyarrow.parquet as pq
    return pq.read_metadata(path).num_rows


def _intact(out: Path, record: UnitRecord) -> bool:
    """Whether every file of every part of a unit's record is there, of its recorded size and row count."""
    try:
        return all((out / name).stat().st_size == size and _rows_in(out / name) == part.rows
                   for part in record.parts for name, size in part.files.items())
    except Exception:  # missing, unreadable, or not an array/table at all
        return False


def _complete(settings: dict) -> dict:
    """Recorded settings with those added since their folder was written, at the values it was made with."""
    return {**IMPLIED, **settings}


def _read_settings(out: Path) -> dict | None:
    try:
        found = json.loads((out / SETTINGS_FILE).read_text(encoding='utf-8'))
    except (OSError, ValueError):
        return None
    return _complete(found) if isinstance(found, dict) and 'format' in found and 'model' in found else None


def recorded_settings(out: Path) -> dict | None:
    """The settings the rows of a folder were made with (its first done unit's), if it holds any."""
    records = read_records(out) if out.is_dir() else []
    return _complete(records[0].settings) if records else None


def _only_leftovers(out: Path) -> bool:
    """Whether DIR holds nothing but what a run may leave before its first record: its lock, its temporary
    files of embed.json, its subfolders with nothing in them."""
    return all(p.name == '.lock' or (temporary_target(p.name) or '') == SETTINGS_FILE or
               (p.name in SUBFOLDERS and p.is_dir() and not any(p.iterdir())) for p in out.iterdir())


def check_folder(out: Path) -> None:
    """Refuse, changing nothing, a folder that is not new, empty (but for a lock) or this tool's output folder."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UsageError(f'{out}: not a folder (a file of that name exists); give a new or empty folder')
    if _only_leftovers(out):
        return
    found = _read_settings(out)
    if found is not None and found.get('format') != FORMAT_VERSION:
        raise UsageError(f'{out} was written by another version of eva_open_clip (folder format '
                         f'{found.get("format")}, this version writes {FORMAT_VERSION}): embed into a new '
                         f'{param("out")} folder')
    if found is not None or read_records(out):
        return
    if (out / SETTINGS_FILE).exists() and read_unit_list(out):
        return  # a damaged embed.json of a folder with no unit done yet
    what = (f'its {SETTINGS_FILE} is not one this tool wrote' if (out / SETTINGS_FILE).exists()
            else f'no {SETTINGS_FILE}')
    raise UsageError(f'{out} is not empty and is not an output folder of eva-open-clip embed ({what}); '
                     f'give a new or empty folder (nothing in {out} was changed)')


def _check_settings(out: Path, settings: FolderSettings,
                    records: list[UnitRecord]) -> tuple[list[UnitRecord], list[str]]:
    """The records made with this folder's settings and notes on what was repaired; refuses other settings;
    (re)writes embed.json when it is not what they say."""
    notes: list[str] = []
    wanted = settings.as_json()
    found = _read_settings(out)
    if records:
        fixed = _complete(records[0].settings)
        differ = [k for k in wanted if fixed.get(k) != wanted[k]]
        if differ:
            detail = '; '.join(f'{k}: {fixed.get(k)!r} there, {wanted[k]!r} now' for k in differ)
            raise UsageError(f'{out} holds the output of another embedding run ({detail}); '
                             f'use a new {param("out")} folder, or the same settings to resume')
        records = [r for r in records if _complete(r.settings) == fixed]
        if found != wanted:
            notes.append(f'note: {out / SETTINGS_FILE} was {"damaged or missing" if found is None else "changed"}; '
                         f'rebuilt from the records of the {len(records)} finished unit(s)')
    elif found is not None and found != wanted:
        notes.append(f'note: no unit of {out} was finished: it takes the settings of this command')
    if found != wanted:
        write_text(out / SETTINGS_FILE, json.dumps(wanted, indent=2) + '\n')
    return records, notes


def _remove_unnamed(out: Path, kept: set[str]) -> None:
    """Remove this tool's part files that no done record names, and its temporary files; nothing else."""
    for sub, names in PART_FOLDERS.items():
        folder = out / sub
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if names.fullmatch(path.name) and f'{sub}/{path.name}' not in kept:
                path.unlink()
        remove_temporary_files(folder, names)
    remove_temporary_files(out / RECORDS, RECORD_NAME)
    remove_temporary_files(out, TOP_FILES)
    for stale in (out / RANKS).iterdir():  # the counts of an earlier run that did not end
        if RECORD_NAME.fullmatch(stale.name):
            stale.unlink()
    remove_temporary_files(out / RANKS, RECORD_NAME)


def _disjoint(records: list[UnitRecord]) -> list[UnitRecord]:
    """The records in unit order, less any that names a source an earlier one holds (its unit is redone)."""
    taken: set[str] = set()
    kept = []
    for record in records:
        reals = record.reals()
        if not reals & taken:
            kept.append(record)
            taken |= reals
    return kept


def open_folder(out: Path, settings: FolderSettings) -> tuple[list[UnitRecord], list[str]]:
    """The records of the done units, and notes on repaired bookkeeping: checks the folder and its settings and
    removes what no done unit names (call while holding the folder's lock; see the module doc)."""
    check_folder(out)
    records, notes = _check_settings(out, settings, _disjoint([r for r in read_records(out) if _intact(out, r)]))
    for sub in SUBFOLDERS:
        if sub != 'text_emb' or settings.captions:  # no empty text_emb/ without --captions
            (out / sub).mkdir(exist_ok=True)
    done = {record_path(out, r.unit).name for r in records}
    for path in _record_paths(out):
        if path.name not in done:
            path.unlink()
    _remove_unnamed(out, {name for r in records for part in r.parts for name in part.files})
    return records, notes


def done_units(out: Path) -> frozenset[int]:
    return frozenset(r.unit for r in read_records(out))


def done_count(out: Path) -> int:
    """How many units are done (their records are there), without reading the records."""
    return len(_record_paths(out))


class Skipped(Protocol):
    """A sample that gave no row, as the tool knows it: its key as read (None when unknown), why, a detail."""

    key: str | bytes | None
    reason: str
    detail: str


@dataclass
class _UnitRows:
    """What a unit has given so far: features and metadata of rows not yet in a part, its skips, its parts."""

    image: list[np.ndarray] = field(default_factory=list)
    text: list[np.ndarray] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)  # fixed columns of the rows not yet written
    json_fields: list[dict | None] = field(default_factory=list)
    skipped: list[SkipRecord] = field(default_factory=list)
    parts: list[Part] = field(default_factory=list)
    total: int = 0


def _save_npy(array: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        with open(path, 'wb') as f:  # np.save given a path would add '.npy' to the temporary name
            np.save(f, np.ascontiguousarray(array, dtype=np.float32))
    return write


class FolderWriter:
    """Writes the parts and unit records of one output folder, as the rows of its units arrive.

    A unit's rows come in its order (units may interleave); its parts are written as they fill, and its
    record once `finish_unit` is called, after every file of its parts is on disk.
    """

    def __init__(self, out: Path, settings: FolderSettings, batch_size: int):
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
        self.out, self.part_size, self.settings = out, settings.part_size, settings.as_json()
        self.batch_size = batch_size
        self.units: dict[int, _UnitRows] = {}
        self.finished: list[UnitRecord] = []  # records of the units this writer completed

    def add(self, unit: int, keys: Sequence[str | bytes], image: np.ndarray | None, text: np.ndarray | None,
            captions: Sequence[str] | None, metas: Sequence[dict | None], skipped: Sequence[Skipped]) -> None:
        """The next rows of `unit` (keys, image and text features, captions, json fields) and the samples
        skipped among them; full parts are written."""
        rows = self.units.setdefault(unit, _UnitRows())
        rows.skipped += [SkipRecord(None if s.key is None else name_text(s.key), str(s.reason), s.detail)
                         for s in skipped]
        if image is not None:
            rows.image.append(image)
            if text is not None:
                rows.text.append(text)
                similarity = (image * text).sum(axis=1)
            for i, key in enumerate(keys):
                row: dict[str, Any] = {'image_path': name_text(key)}
                if text is not None:
                    row.update(caption=captions[i], similarity=float(similarity[i]))
                rows.rows.append(row)
                rows.json_fields.append(metas[i])
            rows.total += len(keys)
        while len(rows.rows) >= self.part_size:
            self._write_part(unit, rows, self.part_size)

    def finish_unit(self, unit: int, source: str | bytes, sources: list[dict], read: dict | None = None) -> UnitRecord:
        """Write `unit`'s last part and then its record (`source`: what people know it by, `sources`: the
        identities of what it was made from, `read`: a remote shard's bytes and SHA-256): the unit is done."""
        rows = self.units.pop(unit, None) or _UnitRows()
        if rows.rows:
            self._write_part(unit, rows, len(rows.rows))
        record = UnitRecord(unit=unit, source=name_text(source), sources=sources, settings=self.settings,
                            batch_size=self.batch_size, rows=rows.total, parts=rows.parts, skipped=rows.skipped,
                            read=read)
        write_text(record_path(self.out, unit), record.to_json())
        self.finished.append(record)
        return record

    def discard_unit(self, unit: int) -> None:
        """Forget what `unit` has given so far and remove its parts: it is not done (the next run redoes it)."""
        rows = self.units.pop(unit, None)
        for part in rows.parts if rows else ():
            for name in part.files:
                (self.out / name).unlink(missing_ok=True)

    def _write_part(self, index: int, unit: _UnitRows, rows: int) -> None:
        name = part_name(index, len(unit.parts))
        files: dict[str, int] = {}
        for kind, pending in (('img_emb', unit.image), ('text_emb', unit.text)):
            if not pending:
                continue  # no captions: no text features
            features = np.concatenate(pending)
            pending[:] = [features[rows:]]
            path = f'{kind}/{kind}_{name}.npy'
            files[path] = write_atomic(self.out / path, _save_npy(features[:rows]))
        table, kinds = metadata.part_table(unit.rows[:rows], unit.json_fields[:rows], self.fixed_types)
        unit.rows, unit.json_fields = unit.rows[rows:], unit.json_fields[rows:]
        meta = f'metadata/metadata_{name}.parquet'
        files[meta] = write_atomic(self.out / meta, lambda p: self.write_table(table, p))
        unit.parts.append(Part(name=name, rows=rows, files=files, columns=kinds))


def give_up(out: Path, settings: FolderSettings, unit: int, source: str | bytes, sources: list[dict],
            why: str) -> UnitRecord:
    """Record `unit` (a shard that could not be read) as given up on for good: done, with no rows."""
    record = UnitRecord(unit=unit, source=name_text(source), sources=sources, settings=settings.as_json(),
                        batch_size=0, rows=0, parts=[], skipped=[], given_up=why)
    write_text(record_path(out, unit), record.to_json())
    return record


def _conform_metadata(out: Path, records: list[UnitRecord]) -> None:
    """Give every metadata part the folder's columns and types (see `metadata`), updating the records."""
    import pyarrow.parquet as pq
    target = metadata.folder_kinds(part.columns for r in records for part in r.parts)
    for record in records:
        changed = False
        for part in record.parts:
            if part.columns == target:
                continue
            name = f'metadata/metadata_{part.name}.parquet'
            table = metadata.conform(pq.read_table(out / name), part.columns, target)
            part.files[name] = write_atomic(out / name, lambda p, t=table: pq.write_table(t, p))
            part.columns = dict(target)
            changed = True
        if changed:  # a crash before this line leaves a part of another size: the unit is redone
            write_text(record_path(out, record.unit), record.to_json())


def finish_folder(out: Path, settings: FolderSettings, ranks: list[RankCounts]) -> Summary:
    """Conform the metadata parts and write DIR/summary.json: settings, totals, this run's counts per rank."""
    records = read_records(out)
    _conform_metadata(out, records)
    reasons: dict[str, int] = {}
    for record in records:
        for s in record.skipped:
            reasons[s.reason] = reasons.get(s.reason, 0) + 1
    summary = Summary(model=settings.model, pretrained=settings.pretrained, precision=settings.precision,
                      units=len(records), rows=sum(r.rows for r in records), parts=sum(len(r.parts) for r in records),
                      skipped=sum(len(r.skipped) for r in records), skipped_by_reason=reasons, ranks=ranks,
                      given_up=[r.source for r in records if r.given_up])
    write_text(out / SUMMARY_FILE, summary.to_json())
    for record in (out / RANKS).iterdir():
        if RECORD_NAME.fullmatch(record.name):
            record.unlink()
    return summary

