"""Progress of `embed` on standard error, the same in both output modes: a bar on a terminal, and a plain
line now and then in a job's log file."""
from __future__ import annotations

import datetime
import sys
import time
from typing import Callable

from tqdm import tqdm


def plural(count: int, noun: str) -> str:
    """'1 unit', '2 units'."""
    return f'{count} {noun}' if count == 1 else f'{count} {noun}s'


class Progress:
    """How much of `total` things (`noun`: units of a folder, images or texts of a FILE.npy) is done.

    `done` counts what is done (for a folder, its unit records, whatever rank wrote them); without it the
    things are the images or texts given to `update`. On a terminal, a bar refreshed every second and left
    complete by `close`; otherwise one plain line every `interval` seconds (default 30). The images this
    process embedded and its rate are shown beside.
    """

    def __init__(self, total: int | None, noun: str, done: Callable[[], int] | None = None,
                 interval: float | None = None, enabled: bool = True):
        self.total, self.noun, self.enabled, self._done = total, noun, enabled, done
        self.tty = sys.stderr.isatty()
        self.interval = interval if interval is not None else (1.0 if self.tty else 30.0)
        self.images = 0
        self.at_start = self.done()
        self.started = self.last = time.monotonic()
        self.bar = tqdm(total=total, initial=self.at_start, unit=f' {noun}', file=sys.stderr,
                        disable=not (enabled and self.tty))

    def done(self) -> int:
        return self._done() if self._done is not None else self.images

    def update(self, images: int) -> None:
        self.images += images
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self.report(now)

    def report(self, now: float) -> None:
        done, elapsed = self.done(), now - self.started
        rate = f'{self.images / elapsed:.4g} img/s' if elapsed > 0 and self.images else 'no image yet'
        by_us = f'{self.images} images by this process at {rate}' if self._done is not None else rate
        if self.tty:
            self.bar.n = done
            self.bar.set_postfix_str(by_us, refresh=True)
            return
        left = ''
        finished = done - self.at_start
        if self.total and finished > 0 and done < self.total:
            seconds = (self.total - done) * elapsed / finished
            left = f', about {datetime.timedelta(seconds=round(seconds))} left'
        of = f'/{self.total}' if self.total is not None else ''
        print(f'progress: {done}{of} {self.noun}s done, {by_us}{left}', file=sys.stderr, flush=True)

    def close(self) -> None:
        """Leave the bar at its final count (the final line follows)."""
        if self.enabled and self.tty:
            self.report(time.monotonic())
        self.bar.close()
