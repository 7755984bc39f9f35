"""The progress bar of `embed`, on standard error."""
from __future__ import annotations

import sys

from tqdm import tqdm


def progress_bar(unit: str, total: int | None = None, enabled: bool = True) -> tqdm:
    return tqdm(unit=unit, total=total, file=sys.stderr, disable=not enabled, smoothing=0.1)
