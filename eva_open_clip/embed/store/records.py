"""The records an output folder holds, typed: a unit's record (`shards/UNIT.json`) with its parts and skips,
a rank's counts of a run (`ranks/RANK.json`) and the summary (`summary.json`). Each is written by
`to_json` and read back by `from_json` only; the JSON has the fields in the order declared here."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any


def _record_text(record: Any, indent: int | None = None) -> str:
    return json.dumps(dataclasses.asdict(record), indent=indent) + '\n'


@dataclass
class Part:
    """A part of a unit: its name N, its rows, the size of each of its files, the kinds of its metadata fields."""

    name: str
    rows: int
    files: dict[str, int]
    columns: dict[str, str]


@dataclass
class SkipRecord:
    """A sample that gave no row: its key as written (None when unknown), its reason code, a detail."""

    key: str | None
    reason: str
    detail: str


@dataclass
class UnitRecord:
    """A finished unit: written last for it; the truth of the folder. `sources` are the identities of what it
    was made from (each with its `path` and `real`, the resolved path or URL that names it once); `read`, a
    remote shard's bytes and their SHA-256; `given_up`, why a shard that could not be read was given up on
    (it has no rows)."""

    unit: int
    source: str
    sources: list[dict]
    settings: dict
    batch_size: int
    rows: int
    parts: list[Part]
    skipped: list[SkipRecord]
    read: dict | None = None
    given_up: str | None = None

    def to_json(self) -> str:
        return _record_text(self)

    @classmethod
    def from_json(cls, obj: dict) -> 'UnitRecord':
        """The record of a parsed `shards/UNIT.json` (KeyError, TypeError or ValueError when it is not one)."""
        fields = dict(obj)
        fields['parts'] = [Part(**p) for p in obj['parts']]
        fields['skipped'] = [SkipRecord(**s) for s in obj['skipped']]
        record = cls(**fields)
        if not all(isinstance(s, dict) and isinstance(s['real'], str) for s in record.sources):
            raise ValueError('sources without a resolved path')
        return record

    def reals(self) -> set[str]:
        """What names each of its sources once (resolved paths and URLs)."""
        return {s['real'] for s in self.sources}


@dataclass
class Unreadable:
    """A unit whose shard could not be read: not done, tried again by the next run."""

    unit: int
    source: str
    detail: str


@dataclass
class RankCounts:
    """One rank's counts of a run. `seconds` and `images_per_s` run from the end of the first batch (loading
    and start-up excluded; `images_per_s` is None when nothing came after it); `input_wait_s` is the part
    of `seconds` spent waiting for decoded images; a rank with no unit left does not load the model."""

    rank: int
    units: int
    rows: int
    skipped: int
    seconds: float
    images_per_s: float | None
    input_wait_s: float
    model_loaded: bool
    unreadable: list[Unreadable]

    def to_json(self) -> str:
        return _record_text(self)

    @classmethod
    def from_json(cls, obj: dict) -> 'RankCounts':
        return cls(**dict(obj, unreadable=[Unreadable(**u) for u in obj['unreadable']]))


@dataclass
class Summary:
    """`summary.json`: the settings that name the model, the folder's totals, this run's counts per rank."""

    model: str
    pretrained: str
    precision: str
    units: int
    rows: int
    parts: int
    skipped: int
    skipped_by_reason: dict[str, int]
    ranks: list[RankCounts]
    given_up: list[str] = field(default_factory=list)  # shards given up on for good, with no rows

    def to_json(self) -> str:
        return _record_text(self, indent=2)

    @classmethod
    def from_json(cls, obj: dict) -> 'Summary':
        return cls(**dict(obj, ranks=[RankCounts.from_json(r) for r in obj['ranks']]))
