"""Decoding for `embed`: units' samples preprocessed in DataLoader workers, as typed batches."""
from __future__ import annotations

import dataclasses
import functools
import itertools
import multiprocessing
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
from PIL import Image

from eva_open_clip import versions
from eva_open_clip.embed.remote import RemoteOptions
from eva_open_clip.embed.samples import unit_samples
from eva_open_clip.embed.tar import ShardRead
from eva_open_clip.embed.units import Unit
from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.decode import ImageRefused, PixelLimits, caption_text
from eva_open_clip.runtime.defaults import IMAGE_KEYS
from eva_open_clip.runtime.pixels import Pixels
from eva_open_clip.runtime.ranks import Ranks
from eva_open_clip.runtime.skips import Reason, Sample, Skip

_WORKER_START = 'forkserver' if 'forkserver' in multiprocessing.get_all_start_methods() else 'spawn'


@dataclass
class Batch:
    """Up to batch-size usable samples of one unit, in the unit's order, and the samples skipped among them.

    `end` is set on the unit's last batch (which may hold no samples), with `read`, a remote shard's bytes and
    their SHA-256; `restart` (no samples) says that the unit's read failed and is tried again from its
    start: what came of it so far is to be forgotten. `decode_s` is the CPU time its decoding took in the
    worker.
    """

    unit: int
    keys: list[str] = field(default_factory=list)
    pixels: torch.Tensor | None = None
    tokens: torch.Tensor | None = None
    captions: list[str] | None = None
    metas: list[dict | None] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    end: bool = False
    decode_s: float = 0.0
    restart: bool = False
    read: dict | None = None

    def pin_memory(self) -> 'Batch':
        """Called by the DataLoader's pinning thread (pin_memory=True on CUDA): pixels and caption tokens go to the
        GPU from page-locked memory, without blocking."""
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        if self.tokens is not None:
            self.tokens = self.tokens.pin_memory()
        return self


@dataclass
class Prepared:
    """A sample ready for the model: its key, preprocessed pixels, caption and its tokens, json fields."""

    key: str
    pixels: torch.Tensor
    caption: str | None
    tokens: torch.Tensor | None
    meta: dict | None


class UnitDataset(torch.utils.data.IterableDataset):
    """The batches of `units`, each unit read whole by one DataLoader worker (units dealt out in turn).

    Whatever a sample holds, it becomes a row of a batch or a `Skip` with a reason code: nothing a
    sample carries raises out of a worker.
    """

    def __init__(self, units: Sequence[Unit], pixels: Pixels, batch_size: int,
                 image_keys: Sequence[str] = IMAGE_KEYS, caption_key: str | None = None,
                 tokenizer: Callable | None = None, limits: PixelLimits | None = None,
                 remote: RemoteOptions = RemoteOptions()):
        self.units, self.pixels, self.batch_size, self.remote = list(units), pixels, batch_size, remote
        self.image_keys, self.caption_key, self.tokenizer = tuple(image_keys), caption_key, tokenizer
        side = max(pixels.preprocess(Image.new('RGB', (8, 8))).shape[-2:])
        self.limits = dataclasses.replace(limits or PixelLimits(), side=int(side))

    def _worker_units(self) -> list[Unit]:
        info = torch.utils.data.get_worker_info()
        return self.units if info is None else self.units[info.id::info.num_workers]

    def _batch(self, unit: Unit, samples: list[Prepared], skipped: list[Skip], end: bool, started: float) -> Batch:
        return Batch(unit.index, [s.key for s in samples],
                     torch.stack([s.pixels for s in samples]) if samples else None,
                     torch.cat([s.tokens for s in samples]) if self.tokenizer is not None and samples else None,
                     [s.caption for s in samples] if self.caption_key is not None else None,
                     [s.meta for s in samples], skipped, end, time.thread_time() - started)

    def _prepared(self, item: Sample) -> Prepared | Skip:
        caption = tokens = None
        if self.caption_key:
            caption = caption_text(item.caption)
            if isinstance(caption, Skip):
                return Skip(item.key, caption.reason, caption.detail)
            if self.tokenizer is not None:
                tokens = self.tokenizer([caption])
        try:
            pixels = self.pixels.prepare(item.image, self.limits)
        except ImageRefused as e:
            return Skip(item.key, e.reason, str(e))
        except Exception as e:  # PIL raises many types for damaged or non-image data
            return Skip(item.key, Reason.UNDECODABLE_IMAGE, type(e).__name__)
        return Prepared(item.key, pixels, caption, tokens, item.meta)

    def _samples(self, unit: Unit, read: ShardRead) -> Iterator[Prepared | Skip]:
        for item in unit_samples(unit.shard, unit.files, self.image_keys, self.caption_key, self.remote, read):
            if isinstance(item, Skip):
                yield item
                continue
            try:
                yield self._prepared(item)
            except Exception as e:  # anything else a sample's content provokes: its own skip, not a stop
                yield Skip(item.key, Reason.BAD_SAMPLE, f'{type(e).__name__}: {str(e)[:200]}')

    def __iter__(self) -> Iterator[Batch]:
        for unit in self._worker_units():
            for attempt in itertools.count():
                read = ShardRead()
                batches = self._unit_batches(unit, read)
                for batch in batches:
                    if batch.end:
                        break
                    yield batch
                failure = read.failure
                if failure is None or not failure.transient or attempt >= self.remote.retries:
                    batch.read = read.record()
                    yield batch
                    break
                yield Batch(unit.index, restart=True)  # what came of this read is forgotten; try again
                time.sleep(self.remote.backoff(attempt))

    def _unit_batches(self, unit: Unit, read: ShardRead) -> Iterator[Batch]:
        """The batches of one read of a unit, the last one with `end` set."""
        started = time.thread_time()  # this thread's CPU time, restarted after each batch is taken
        samples: list[Prepared] = []
        skipped: list[Skip] = []
        for prepared in self._samples(unit, read):
            if isinstance(prepared, Skip):
                skipped.append(prepared)
                continue
            samples.append(prepared)
            if len(samples) == self.batch_size:
                yield self._batch(unit, samples, skipped, end=False, started=started)
                samples, skipped, started = [], [], time.thread_time()
        yield self._batch(unit, samples, skipped, end=True, started=started)


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            return f.read().rsplit(b')', 1)[1].split()[0] not in (b'Z', b'X')
    except FileNotFoundError:
        if os.path.isdir('/proc/self'):
            return False
    try:  # no /proc
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _exit_with(main_pid: int, worker_id: int) -> None:
    """DataLoader `worker_init_fn`: end this worker within a second of the main process's death.

    Also silences the broken connections of the worker's helper threads when the main process stops.

    torch's own watchdog checks the worker's parent, which for a fork-server worker is the fork server,
    and the fork server lives as long as any of its workers (each holds its liveness pipe): after a
    SIGKILL of the main process, both would live on for ever, holding the job's output pipes open.
    """
    def watch() -> None:
        while _alive(main_pid):
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name='main-process-watch', daemon=True).start()
    # a batch's memory is handed over by a helper thread (multiprocessing's resource sharer, which reports
    # its errors through sys.excepthook); when the main process stops (interrupted), its connections
    # break: expected, and no traceback in the job's log
    report = sys.excepthook
    sys.excepthook = lambda kind, error, trace: None if issubclass(kind, OSError) else report(kind, error, trace)


def _end_workers(data: Iterator) -> None:
    """End a DataLoader iterator's decoding workers now (killed where they still run: what they were decoding
    is not wanted any more).

    torch ends them when its iterator is exhausted or collected, and has no public call to end them sooner;
    a job that stops on an error raised inside the loader holds the iterator in its traceback (a notebook
    keeps the last one), so that its workers would live on. `_workers` and `_shutdown_workers` are torch's
    own (2.1 to 2.14; `tests/embed/test_embed_at_scale.py` fails if they change)."""
    for worker in data._workers:
        if worker.is_alive():
            worker.terminate()
    data._shutdown_workers()


SHM = '/dev/shm'
PREFETCH = 4  # batches each decoding worker keeps ready


def shm_prefetch(workers: int, batch_bytes: int, shm: str = SHM) -> int:
    """Batches per worker that fit the shared memory the workers hand their batches over in.

    Containers often have little (Docker's default is 64 MB), and a DataLoader that overruns it dies
    of a bus error. Lowers the prefetch to what fits, saying so, or refuses in one line when not even
    one batch per worker fits.
    """
    if not workers or not os.path.isdir(shm):
        return PREFETCH
    free = shutil.disk_usage(shm).free
    fits = int(free // (workers * batch_bytes * 2))  # a batch can be in shared memory twice while handed over
    if fits >= PREFETCH:
        return PREFETCH
    mb = f'{free / 2 ** 20:.0f} MB'
    if fits < 1:
        raise UsageError(f'{shm} has {mb} free, too little for {workers} decoding worker(s) handing over batches of '
                         f'{batch_bytes / 2 ** 20:.0f} MB: give the container more shared memory (e.g. docker run '
                         f"--shm-size 8g), or lower {param('batch_size')} or {param('workers')} "
                         f"({param('workers', 0)} decodes in this process)")
    print(f'note: {shm} has {mb} free: each decoding worker keeps {fits} batch(es) ready instead of {PREFETCH} '
          f'(more shared memory, e.g. docker run --shm-size 8g, lets them keep {PREFETCH})', file=sys.stderr)
    return fits


class DecodedBatches:
    """The dataset's batches through a DataLoader with `workers` decoding processes, timing the waits.

    `waited` is how long the consumer waited for decoded batches since it called `start_clock` (where its
    rate starts, after its first batch, which includes the workers' start-up): near zero when the model is
    the bottleneck, and the cue to raise the workers when not. Workers are started by a fork server rather
    than forked from this process, which holds the model (a fork would share its pages copy-on-write and
    make the model's memory writes fault); under torchrun they are plain forks, as a fork server hung there
    with torch 2.1.

    On the CPU, the model and the decoding workers share the cores. When decoding an image costs more
    CPU time than encoding it (a small model), the model's torch threads are reduced by the number of
    workers after the first few batches: left as they are, they contend with the workers for the
    cores, and each of the model's parallel steps waits for a thread the workers displaced (a tiny
    model's batch took up to 270 ms so, instead of 3). The workers report their decoding time with each
    batch; the model's need is the least CPU time per image this process spent on a batch, as
    contention only ever adds to it.
    """

    DECIDE_AFTER = 4  # batches measured before the threads are settled (the first one is not measured)
    STALLED_S = 1800  # a worker that has not delivered a batch for this long is stuck: the job stops, resumable

    def __init__(self, dataset: torch.utils.data.IterableDataset, workers: int, device_type: str,
                 prefetch: int = PREFETCH, quiet_s: float | None = None, settle_threads: bool = True):
        self.dataset, self.workers, self.device_type, self.prefetch = dataset, workers, device_type, prefetch
        self.settle_threads = settle_threads  # False: the model's threads stay as they are (training's exactness)
        if quiet_s is not None:
            self.STALLED_S = quiet_s
        self.waited, self._clock = 0.0, None
        self.decode_cpu, self.decoded, self.model_cpu_per_image = 0.0, 0, float('inf')

    def __iter__(self) -> Iterator[Batch]:
        start = 'fork' if Ranks.from_env().world_size > 1 else _WORKER_START
        extra = dict(prefetch_factor=self.prefetch, multiprocessing_context=start, timeout=self.STALLED_S,
                     worker_init_fn=functools.partial(_exit_with, os.getpid())) if self.workers else {}
        if self.workers > 1 and versions.DATALOADER_IN_ORDER:  # whichever worker is ready first: a unit's
            extra['in_order'] = False  # batches still come in order, from the one worker that reads it
        # a generator of its own: starting the loader draws no number from torch's global one, which a training
        # run's random layers use (a resumed run starts its loader at another point of that sequence)
        data = iter(torch.utils.data.DataLoader(self.dataset, batch_size=None, num_workers=self.workers,
                                                pin_memory=self.device_type == 'cuda',
                                                generator=torch.Generator().manual_seed(0), **extra))
        threads = torch.get_num_threads()
        try:
            for seen in itertools.count():
                asked = time.perf_counter()
                try:
                    batch = next(data, None)
                except RuntimeError:  # the DataLoader's own timeout, or a worker's error re-raised
                    if not self.workers or time.perf_counter() - asked < self.STALLED_S:
                        raise
                    raise ToolError(f'no decoded batch came for {self.STALLED_S} s (a stalled read of a shard?); '
                                    f'run the same command to resume') from None
                if batch is None:
                    return
                received, cpu = time.perf_counter(), time.process_time()
                yield batch
                if self._clock is not None:
                    self.waited += max(0.0, received - max(asked, self._clock))
                if seen and batch.keys:  # the first batch includes the workers' start-up
                    self.decode_cpu += batch.decode_s
                    self.decoded += len(batch.keys)
                    used = (time.process_time() - cpu) / len(batch.keys)
                    self.model_cpu_per_image = min(self.model_cpu_per_image, used)
                if seen == self.DECIDE_AFTER and self.settle_threads:
                    self._settle_threads()
        finally:
            torch.set_num_threads(threads)  # a library caller gets its setting back
            if self.workers:
                _end_workers(data)

    def start_clock(self) -> float:
        """Waits count in `waited` from now (the time returned) on."""
        self._clock = time.perf_counter()
        return self._clock

    def _settle_threads(self) -> None:
        if self.device_type == 'cpu' and self.workers and self.decoded and \
                self.decode_cpu / self.decoded > self.model_cpu_per_image:
            torch.set_num_threads(max(1, torch.get_num_threads() - self.workers))


def default_workers(local_world_size: int = 1, device_type: str = 'cpu') -> int:
    """DataLoader workers per rank: the cores this process may use, shared among the ranks on the node; with a
    GPU, less the two that the main process and its pinning thread keep busy."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else (os.cpu_count() or 1)
    return max(1, cores // max(1, local_world_size) - (2 if device_type == 'cuda' else 0))
