"""`DIR/units.jsonl`: the job's units and their sources, one JSON object per line (`{"unit": N, "sources":
[identity, ...]}`), written by the job when its units change and read back on resume."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from eva_open_clip.durable import write_text
from eva_open_clip.embed.store.paths import UNITS_FILE


def read_unit_list(out: Path) -> list[dict] | None:
    """The units recorded in DIR/units.jsonl ([] when there is none), or None when it is damaged."""
    try:
        text = (out / UNITS_FILE).read_text(encoding='utf-8')
    except FileNotFoundError:
        return []
    try:
        entries = [json.loads(line) for line in text.splitlines() if line]
    except ValueError:
        return None
    if not all(isinstance(e, dict) and isinstance(e.get('unit'), int) and isinstance(e.get('sources'), list)
               for e in entries):
        return None
    return entries


def write_unit_list(out: Path, entries: Sequence[dict]) -> None:
    write_text(out / UNITS_FILE, ''.join(json.dumps(entry) + '\n' for entry in entries))
