"""The units of work of an `embed` job, listed once and recorded in its output folder.

A unit is one tar shard, or a run of up to `part_size` consecutive image files; each is written as
its own part(s) and marked done as a whole. `plan_units` lists the inputs at the start of a job and
matches them against `DIR/units.jsonl` (one JSON line per unit: its number, and its sources with the
identity that shows a change). A source already recorded stays in its unit, so no done unit's rows
ever move; sources that were added since (a new shard, a new file in a folder, new lines in a list)
go into new units numbered after the recorded ones; a recorded source that changed or disappeared is
refused by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from .data import InputError, Source, input_sources
from .durable import write_text

UNITS_FILE = 'units.jsonl'


@dataclass(frozen=True)
class Unit:
    """A unit of work: one tar shard, or image files (its `sources`, in order)."""

    index: int
    sources: tuple[Source, ...]

    @property
    def shard(self) -> str | None:
        return self.sources[0].path if self.sources and self.sources[0].is_shard else None

    @property
    def files(self) -> tuple[str, ...]:
        return () if self.shard is not None else tuple(s.path for s in self.sources)

    @property
    def source(self) -> str:
        """What people know the unit by: the shard, or its first file."""
        return self.sources[0].path if self.sources else ''

    def record(self) -> str:
        return json.dumps(dict(unit=self.index, sources=[s.identity() for s in self.sources]))

    @staticmethod
    def from_record(line: str) -> 'Unit':
        record = json.loads(line)
        return Unit(record['unit'], tuple(Source.from_identity(s) for s in record['sources']))


def group_units(sources: Iterable[Source], part_size: int, start: int = 0) -> list[Unit]:
    """Units numbered from `start`: each shard alone, consecutive image files in runs of `part_size`."""
    units: list[Unit] = []
    run: list[Source] = []

    def close_run() -> None:
        if run:
            units.append(Unit(start + len(units), tuple(run)))
            run.clear()

    for source in sources:
        if source.is_shard:
            close_run()
            units.append(Unit(start + len(units), (source,)))
        else:
            run.append(source)
            if len(run) == part_size:
                close_run()
    close_run()
    return units


def list_units(inputs: Sequence[str], files_from: str | None, part_size: int) -> list[Unit]:
    """The units of the inputs, numbered from 0 in input order."""
    return group_units(input_sources(inputs, files_from), part_size)


def read_units(out: Path) -> list[Unit]:
    path = out / UNITS_FILE
    if not path.exists():
        return []
    return [Unit.from_record(line) for line in path.read_text(encoding='utf-8').splitlines() if line]


def plan_units(out: Path, inputs: Sequence[str], files_from: str | None, part_size: int) -> list[Unit]:
    """The job's units: the recorded ones, then units of the sources added since; recorded anew if any were."""
    current = list(input_sources(inputs, files_from))
    recorded = read_units(out)
    known = {s.path: s for unit in recorded for s in unit.sources}
    now = {s.path: s for s in current}
    remedy = f'restore it, or embed into a new --out folder (the inputs of {out} are listed in {out / UNITS_FILE})'
    for path, source in known.items():
        found = now.get(path)
        if found is None:
            raise InputError(f'{path}: embedded into {out} before, but no longer among the inputs; {remedy}')
        if found != source:
            was = ', '.join(f'{k} {a} then, {b} now' for k, a, b in
                            (('size', source.size, found.size), ('mtime_ns', source.mtime_ns, found.mtime_ns)) if a != b)
            raise InputError(f'{path}: changed since it was listed for {out} ({was}); {remedy}')
    added = [s for s in current if s.path not in known]
    if added:
        recorded += group_units(added, part_size, start=len(recorded))
        write_text(out / UNITS_FILE, ''.join(unit.record() + '\n' for unit in recorded))
    return recorded
