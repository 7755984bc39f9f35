"""Progress of `embed` on standard error: a bar on a terminal, a plain line now and then in a job log."""
from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm


def progress_bar(unit: str, total: int | None = None, enabled: bool = True) -> tqdm:
    return tqdm(unit=unit, total=total, file=sys.stderr, disable=not enabled, smoothing=0.1)


class JobProgress:
    """The whole job's progress, as the output folder shows it: units done of the total, whatever rank did them.

    On a terminal, a bar over the units, refreshed every second; otherwise (a job's log file), one plain
    line every `interval` seconds (default 30). This process's images and rate are shown beside.
    """

    def __init__(self, records: Path, total: int, interval: float | None = None, enabled: bool = True):
        self.records, self.total, self.enabled = records, total, enabled
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self.at_start = self._done()
        self.images, self.started = 0, time.monotonic()
        self.last = self.started
        self.bar = tqdm(total=total, initial=self.at_start, unit='unit', file=sys.stderr,
                        disable=not (enabled and self.tty))

    def _done(self) -> int:
        with os.scandir(self.records) as entries:
            return sum(1 for e in entries if e.name.endswith('.json') and not e.name.startswith('.'))

    def update(self, images: int) -> None:
        self.images += images
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        done, elapsed = self._done(), now - self.started
        rate = self.images / elapsed if elapsed > 0 else 0.0
        if self.tty:
            self.bar.n = done
            self.bar.set_postfix_str(f'{self.images} img, {rate:.3g} img/s', refresh=True)
            return
        finished = done - self.at_start
        left = ''
        if finished > 0 and done < self.total:
            seconds = (self.total - done) * elapsed / finished
            left = f', about {datetime.timedelta(seconds=round(seconds))} left'
        print(f'progress: {done}/{self.total} units done, {self.images} images by this process at '
              f'{rate:.4g} img/s{left}', file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
