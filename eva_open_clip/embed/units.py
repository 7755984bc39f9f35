"""The units of work of an `embed` job, listed once and recorded in its output folder.

A unit is one tar shard, or a run of up to `part_size` consecutive image files; each is written as
its own part(s) and marked done as a whole. `plan_units` lists the inputs at the start of a job, each
file (by resolved path) or URL once, and matches them against what the folder records: the done
units (each done record names its sources, and is the truth about what is on disk), then the other
units of `DIR/units.jsonl` (one JSON line per unit: its number, and its sources with the identity
that shows a change). A source already recorded stays in its unit, so no done unit's rows ever move;
sources that were added since (a new shard, a new file in a folder, new lines in a list) go into new
units numbered after the recorded ones; a source of a done unit that changed or disappeared is refused by
name, while a unit not done follows its sources (see `plan_units`). A damaged or missing `units.jsonl` is
rebuilt from the done records.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from eva_open_clip.embed.inputs import InputError, Listing, Source, list_sources
from eva_open_clip.embed.store.paths import UNITS_FILE
from eva_open_clip.embed.store.unit_list import read_unit_list, write_unit_list
from eva_open_clip.errors import param


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

    def identity(self) -> list[dict]:
        return [s.identity() for s in self.sources]

    def entry(self) -> dict:
        """The unit as units.jsonl and its record hold it."""
        return dict(unit=self.index, sources=self.identity())

    @staticmethod
    def from_entry(entry: dict) -> 'Unit':
        return Unit(int(entry['unit']), tuple(Source.from_identity(s) for s in entry['sources']))


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


def list_units(inputs: Sequence[str], files_from: str | None, part_size: int) -> tuple[list[Unit], Listing]:
    """The units of the inputs (each source once), numbered from 0 in input order, and what listing passed by."""
    sources, listing = list_sources(inputs, files_from)
    return group_units(sources, part_size), listing


def read_units(out: Path) -> list[Unit] | None:
    """The units recorded in DIR/units.jsonl ([] when there is none), or None when it is damaged."""
    entries = read_unit_list(out)
    try:
        return None if entries is None else [Unit.from_entry(entry) for entry in entries]
    except (ValueError, KeyError, TypeError):
        return None


def _recorded(out: Path, done: dict[int, Unit]) -> tuple[list[Unit], list[Unit] | None, str | None]:
    """The done units, then the units.jsonl units that agree with them; what units.jsonl holds (None when
    damaged); a note when it was not sound."""
    listed = read_units(out)
    note = None
    if listed is None or (not listed and done):
        note = (f'note: {out / UNITS_FILE} was {"damaged" if listed is None else "missing"}; rebuilt from the '
                f'records of the {len(done)} finished unit(s)')
    units = dict(done)
    taken = {s.real for unit in done.values() for s in unit.sources}
    for unit in listed or []:
        if unit.index in units or any(s.real in taken for s in unit.sources):
            continue  # a done record says what that unit holds
        units[unit.index] = unit
        taken.update(s.real for s in unit.sources)
    return [units[i] for i in sorted(units)], listed, note


def _check_done(out: Path, unit: Unit, now: dict[str, Source]) -> None:
    """A done unit's sources are all among the inputs, unchanged: no row of the folder may move."""
    remedy = (f'restore it, or embed into a new {param("out")} folder (the inputs of {out} are listed in '
              f'{out / UNITS_FILE})')
    for source in unit.sources:
        found = now.get(source.real)
        if found is None:
            raise InputError(f'{source.path}: embedded into {out} before, but no longer among the inputs; {remedy}')
        if (found.size, found.mtime_ns) != (source.size, source.mtime_ns):
            was = ', '.join(f'{k} {a} then, {b} now' for k, a, b in
                            (('size', source.size, found.size), ('mtime_ns', source.mtime_ns, found.mtime_ns))
                            if a != b)
            raise InputError(f'{source.path}: changed since it was listed for {out} ({was}); {remedy}')


def plan_units(out: Path, inputs: Sequence[str], files_from: str | None, part_size: int,
               done: dict[int, Unit]) -> tuple[list[Unit], Listing, str | None]:
    """The job's units (the recorded ones, then units of the sources added since; recorded anew if changed),
    what listing the inputs passed by, and a note when units.jsonl had to be rebuilt.

    Only done units are held to their sources; a unit not done takes its sources as the inputs give them now
    (a URL signed anew, a file changed), and leaves out those no longer among them (a shard that stays lost).
    """
    current, listing = list_sources(inputs, files_from)
    recorded, listed, note = _recorded(out, done)
    now = {s.real: s for s in current}
    units = []
    for unit in recorded:
        if unit.index in done:
            _check_done(out, unit, now)
            units.append(unit)
        elif any(s.real in now for s in unit.sources):
            units.append(Unit(unit.index, tuple(now[s.real] for s in unit.sources if s.real in now)))
    known = {s.real for unit in recorded for s in unit.sources}
    added = [s for s in current if s.real not in known]
    units += group_units(added, part_size, start=recorded[-1].index + 1 if recorded else 0)
    if units != listed:
        write_unit_list(out, [unit.entry() for unit in units])
    return units, listing, note
