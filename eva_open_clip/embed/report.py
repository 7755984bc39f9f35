"""What a job says at its end, on standard error: what it embedded and skipped, and how fast."""
from __future__ import annotations

import sys
from typing import Sequence

from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.store.records import RankCounts
from eva_open_clip.runtime.skips import Skip


def skipped_text(reasons: dict[str, int]) -> str:
    """'none skipped', or '3 skipped: bad_json 1, image_too_large 2'."""
    if not reasons:
        return 'none skipped'
    return f'{sum(reasons.values())} skipped: ' + ', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))


def reasons_of(skipped: Sequence[Skip]) -> dict[str, int]:
    reasons: dict[str, int] = {}
    for skip in skipped:
        reasons[str(skip.reason)] = reasons.get(str(skip.reason), 0) + 1
    return reasons


def warn_skipped(skipped: Sequence[Skip]) -> None:
    """A warning naming the first 20 samples skipped."""
    if skipped:
        shown = ', '.join(f'{"?" if s.key is None else name_text(s.key)} ({s.reason})' for s in skipped[:20])
        more = f' and {len(skipped) - 20} more' if len(skipped) > 20 else ''
        print(f'warning: skipped {len(skipped)} sample(s): {shown}{more}', file=sys.stderr)


def rate_text(ranks: Sequence[RankCounts]) -> str:
    """This run's rate, and how much of its time the model waited for decoded images (raise --workers)."""
    rates = [r.images_per_s for r in ranks if r.images_per_s]
    if not rates:
        return ''
    waited = sum(r.input_wait_s for r in ranks) / sum(r.seconds for r in ranks)
    return f', {sum(rates):.4g} img/s after the first batch ({waited:.1%} of it waiting for decoded images)'
