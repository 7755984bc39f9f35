"""`embed --out DIR`: the job that embeds a large collection into an output folder.

One job at a time writes a folder (its lock, held by rank 0 for the whole job). Before the model is
loaded, rank 0 opens the folder (`store.folder.open_folder`) and lists the job's units
(`units.plan_units`); every rank then takes
every WORLD_SIZE-th unit that is not done, decodes it in DataLoader workers (`loader`), encodes it
(`encoder.encoded`) and writes its parts (`store.folder.FolderWriter`, on a thread of its own), so the parts
are the same whatever the number of ranks and workers. At
the end rank 0 conforms the metadata parts and writes `summary.json`. A run that stops for any reason
is resumed by running the same command again.
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

from eva_open_clip.durable import write_text
from eva_open_clip.embed.job import EncodedUnits, Reading, named_shards
from eva_open_clip.embed.store.folder import (
    FolderSettings,
    FolderWriter,
    check_folder,
    done_count,
    done_units,
    finish_folder,
    give_up,
    open_folder,
)
from eva_open_clip.embed.store.lock import OutputLock
from eva_open_clip.embed.store.names import name_text
from eva_open_clip.embed.store.paths import rank_record
from eva_open_clip.embed.store.records import RankCounts, Summary, Unreadable
from eva_open_clip.embed.units import Unit, plan_units, read_units
from eva_open_clip.errors import ToolError, UsageError
from eva_open_clip.runtime.encoder import Encoder
from eva_open_clip.runtime.progress import Progress, plural
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.runtime.skips import UNREADABLE, Skip


def embed_folder(load_encoder: Callable[[], Encoder], settings: FolderSettings, reading: Reading,
                 inputs: Sequence[str], files_from: str | None, out: Path, workers: int, batch_size: int = 32,
                 ranks: Ranks = Ranks(), progress_interval: float | None = None, quiet: bool = False,
                 give_up: Sequence[str] = ()) -> Summary | None:
    """Embed into the folder `out`; return the summary on rank 0 (None elsewhere). The shards that `give_up`
    names, never read, are given up on first.

    The only collective is at the start (rank 0's verdict on the folder). At the end each rank records
    its counts in `DIR/ranks/`, and rank 0 builds the summary once every rank's record is there, so ranks
    that finish hours apart wait on nothing with a timeout (each rank's counts: `records.RankCounts`).
    """
    out = Path(out)
    lock = OutputLock.for_folder(out)
    try:
        failure = None
        if ranks.rank == 0:
            try:
                check_folder(out)  # before the lock file is made: a folder of the user's is left as it is
                out.mkdir(parents=True, exist_ok=True)
                lock.acquire()
                records, notes = open_folder(out, settings)
                units, listing, note = plan_units(out, inputs, files_from, settings.part_size,
                                                  {r.unit: Unit.from_entry(dict(unit=r.unit, sources=r.sources))
                                                   for r in records})
                notes += _given_up(out, settings, units, {r.unit for r in records}, give_up)
                for line in notes + [note] + listing.notes():
                    if line:
                        print(line, file=sys.stderr)
                if not units:
                    raise UsageError('nothing to embed: the inputs hold no image file or shard')
            except ToolError as e:
                failure = e
            except OSError as e:  # the inputs' problems are InputErrors: this is about the folder
                failure = ToolError(f'{e.filename or out}: {e.strerror or e}')
        failure = ranks.share(failure)
        if failure is not None:
            raise failure
        units = read_units(out) or []
        done = done_units(out)
        mine = [u for u in units if u.index % ranks.world_size == ranks.rank and u.index not in done]
        progress = Progress(len(units), 'unit', lambda: done_count(out), progress_interval,
                            enabled=ranks.rank == 0 and not quiet)
        try:
            counts = _embed_units(load_encoder, settings, reading, mine, out, workers, batch_size, progress,
                                  ranks.rank) if mine else \
                RankCounts(rank=ranks.rank, units=0, rows=0, skipped=0, seconds=0.0, images_per_s=None,
                           input_wait_s=0.0, model_loaded=False, unreadable=[])
        finally:
            progress.close()
        write_text(rank_record(out, ranks.rank), counts.to_json())
        if ranks.rank != 0:
            return None
        return finish_folder(out, settings, _wait_for_ranks(out, ranks.world_size))
    finally:
        lock.release()


def _given_up(out: Path, settings: FolderSettings, units: list[Unit], done: set[int],
              shards: Sequence[str]) -> list[str]:
    """Record as given up on the shards named (that the job lists and that are not done); notes saying so."""
    by_index = {unit.index: unit for unit in units}
    notes, given = [], []
    for index in named_shards(units, shards):
        unit = by_index[index]
        if index in done:
            notes.append(f'note: {unit.source} is done: not given up on')
        else:
            give_up(out, settings, index, unit.source, unit.identity(), 'given up on after failed reads')
            done.add(index)
            given.append(unit.source)
    if given:
        notes.append(f"note: gave up on {plural(len(given), 'shard')} for good (no rows; listed in summary.json): "
                     f"{', '.join(given[:5])}{' ...' if len(given) > 5 else ''}")
    return notes


def _wait_for_ranks(out: Path, world_size: int) -> list[RankCounts]:
    """Every rank's record of this run, waiting (on files, not on a collective) for those still working.

    A rank that dies ends the torchrun job, this rank included, so the wait ends with the job.
    """
    paths = [rank_record(out, r) for r in range(world_size)]
    while not all(p.exists() for p in paths):
        time.sleep(1.0)
    return [RankCounts.from_json(json.loads(p.read_text())) for p in paths]


class _InBackground:
    """Calls to `target` run in order on one thread, so that the encoding loop never waits for them (a part's
    writes and fsyncs); the first failure there is raised at the loop's next call, or by `close`. The calls are
    a unit's rows and then its end, so a kill at any moment leaves what a kill of the loop itself would."""

    def __init__(self, target: object, depth: int = 8):
        self.target, self.error, self.stopping = target, None, False
        self.calls: queue.Queue = queue.Queue(maxsize=depth)
        self.thread = threading.Thread(target=self._work, name='part-writer', daemon=True)
        self.thread.start()

    def call(self, name: str, *args) -> None:
        self._raise()
        self.calls.put((name, args))

    def close(self) -> None:
        """Wait for every call made; raise the first failure."""
        self.calls.put(None)
        self.thread.join()
        self._raise()

    def abandon(self) -> None:
        """Stop after the call under way: the units not finished are redone by the next run."""
        self.stopping = True
        self.calls.put(None)
        self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

    def _work(self) -> None:
        while (call := self.calls.get()) is not None:
            if self.error is None and not self.stopping:
                try:
                    getattr(self.target, call[0])(*call[1])
                except BaseException as e:  # raised in the encoding loop, where it stops the job
                    self.error = e


def _embed_units(load_encoder: Callable[[], Encoder], settings: FolderSettings, reading: Reading, units: list[Unit],
                 out: Path, workers: int, batch_size: int, progress: Progress, rank: int) -> RankCounts:
    encoder = load_encoder()
    folder = FolderWriter(out, settings, batch_size)
    by_index = {u.index: u for u in units}
    unreadable: dict[int, Skip] = {}  # units whose shard could not be read: not done, redone by the next run
    first = None  # when the first batch was done: the rate excludes loading and start-up
    first_rows = 0
    encoded = EncodedUnits(encoder, units, batch_size, workers, reading)
    batches = encoded.decoded
    writer = _InBackground(folder)
    try:
        for batch, image, text in encoded:
            if batch.restart:  # a remote read failed, and is tried again from the unit's start
                writer.call('discard_unit', batch.unit)
                unreadable.pop(batch.unit, None)
                continue
            writer.call('add', batch.unit, batch.keys, image, text, batch.captions, batch.metas, batch.skipped)
            failed = next((s for s in batch.skipped if s.reason == UNREADABLE), None)
            if failed is not None:
                unreadable[batch.unit] = failed
            if batch.end:
                unit = by_index[batch.unit]
                if batch.unit in unreadable:
                    writer.call('discard_unit', batch.unit)
                else:
                    writer.call('finish_unit', batch.unit, unit.source, unit.identity(), batch.read)
            progress.update(len(batch.keys))
            if first is None and batch.keys:
                first, first_rows = batches.start_clock(), len(batch.keys)
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    rows = sum(r.rows for r in folder.finished)
    seconds = time.perf_counter() - first if first is not None else 0.0
    return RankCounts(rank=rank, units=len(folder.finished), rows=rows,
                      skipped=sum(len(r.skipped) for r in folder.finished),
                      seconds=seconds,
                      images_per_s=(rows - first_rows) / seconds if seconds > 0 and rows > first_rows else None,
                      input_wait_s=batches.waited, model_loaded=True,
                      unreadable=[Unreadable(unit=i, source=name_text(by_index[i].source), detail=skip.detail)
                                  for i, skip in unreadable.items()])
