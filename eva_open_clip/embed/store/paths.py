"""Every file name of an `embed` output folder, in one place: what this tool writes there, and so all it
ever removes. N, a part's number, is `part_name(unit, k)`."""
from __future__ import annotations

import re
from pathlib import Path

SETTINGS_FILE = 'embed.json'
PART_FOLDERS = {'img_emb': re.compile(r'img_emb_\d+\.npy'), 'text_emb': re.compile(r'text_emb_\d+\.npy'),
                'metadata': re.compile(r'metadata_\d+\.parquet')}
RECORD_NAME = re.compile(r'\d+\.json')
RECORDS = 'shards'  # a record per finished unit
RANKS = 'ranks'  # each rank's counts of the current run
SUBFOLDERS = (*PART_FOLDERS, RECORDS, RANKS)
UNITS_FILE = 'units.jsonl'  # the job's units and their sources
SUMMARY_FILE = 'summary.json'
# this tool's files at the top of DIR
TOP_FILES = re.compile('|'.join(map(re.escape, (SETTINGS_FILE, UNITS_FILE, SUMMARY_FILE))))


def sortable_number(n: int, width: int) -> str:
    """`n` zero-padded to `width` digits below 10**width - 1; past that, width nines, the count of the
    remaining digits less one, and those digits: digit strings whose name order is numeric order."""
    top = 10 ** width - 1
    if n < top:
        return f'{n:0{width}d}'
    rest = str(n - top)
    return '9' * width + str(len(rest) - 1) + rest


def part_name(unit: int, k: int) -> str:
    """N of part k of a unit: `UNIT*1000 + k` in nine digits while unit < 999999 and k < 999."""
    return sortable_number(unit, 6) + sortable_number(k, 3)


def rank_record(out: Path, rank: int) -> Path:
    """Where a rank of the running job records its counts (read for the summary, then removed)."""
    return out / RANKS / f'{rank:05d}.json'


def record_path(out: Path, unit: int) -> Path:
    """Where the record of a finished unit is (written last for it)."""
    return out / RECORDS / f'{sortable_number(unit, 6)}.json'
