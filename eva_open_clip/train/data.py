"""The training pairs of `train`, in an order that the seed alone fixes (not the number of workers or ranks'
timing), so that a run resumed from a checkpoint sees exactly the samples an uninterrupted one would.

A run has as many data streams as it had processes when it started. Each epoch takes the shards in an order drawn
from (seed, epoch); stream s of S takes every S-th of them. A shard is
read whole by one decoding worker, as `embed` reads it (the same readers, remote shards, skip rules), and its
usable pairs are put in an order drawn from (seed, epoch, shard); the rank's stream is those shards' pairs one
after another, epoch after epoch, cut into batches. Where a rank stands in its stream (`Position`: the epoch, how
many of its shards of that epoch were begun, how many pairs of the last one were taken) is all a checkpoint
needs: a resumed run reads from that shard on, dropping the pairs already taken.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Iterator, Sequence

import torch

from eva_open_clip.embed.job import Reading
from eva_open_clip.embed.loader import DecodedBatches, UnitDataset, shm_prefetch
from eva_open_clip.embed.units import Unit
from eva_open_clip.errors import UsageError, param
from eva_open_clip.runtime.pixels import Pixels
from eva_open_clip.runtime.skips import Reason

CHUNK = 64  # pairs a decoding worker hands over at a time


@dataclass(frozen=True)
class Position:
    """Where a rank stands in its stream: `epoch`, the shards of that epoch's order it began (`shards`), the pairs
    of the last begun shard already taken (`taken`; 0 when the next batch starts a shard)."""

    epoch: int = 0
    shards: int = 0
    taken: int = 0

    def as_json(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Share:
    """The streams a process reads (`streams`) and, of each step's batch of them, the part `part` of `parts`."""

    streams: tuple[int, ...]
    part: int = 0
    parts: int = 1

    @classmethod
    def of(cls, rank: int, world_size: int, streams: int, batch_size: int) -> 'Share':
        """Process `rank` of `world_size`'s share of a run of `streams` streams of `batch_size` pairs a step."""
        if streams % world_size == 0:
            each = streams // world_size
            return cls(tuple(range(rank * each, (rank + 1) * each)))
        if world_size % streams == 0 and batch_size % (world_size // streams) == 0:
            parts = world_size // streams
            return cls((rank // parts,), rank % parts, parts)
        raise UsageError(f'the run was started on {streams} process(es) with {param("batch_size")} {batch_size}: '
                         f'resume it on a number of processes that divides {streams}, or a multiple of it that '
                         'divides the batch size')


def _generator(*seeds: int) -> torch.Generator:
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2 ** 62)
    return torch.Generator().manual_seed(value)


def epoch_shards(units: Sequence[Unit], seed: int, epoch: int, stream: int, streams: int) -> list[Unit]:
    """Stream `stream`'s shards of `epoch`, in the epoch's order."""
    order = torch.randperm(len(units), generator=_generator(seed, epoch)).tolist()
    return [units[i] for i in order][stream::streams]


class Pairs:
    """Batches of (uint8 pixels, tokens) of one stream from a position on, and the position after each."""

    def __init__(self, units: Sequence[Unit], pixels: Pixels, tokenizer, reading: Reading, batch_size: int,
                 workers: int, seed: int, stream: int = 0, streams: int = 1, device_type: str = 'cpu'):
        if len(units) < streams:
            raise UsageError(f'{len(units)} shard(s) for {streams} processes: give each process a shard at least')
        self.units, self.pixels, self.tokenizer, self.reading = list(units), pixels, tokenizer, reading
        self.batch_size, self.workers, self.seed = batch_size, workers, seed
        self.stream, self.streams, self.device_type = stream, streams, device_type
        self.skipped: dict[str, int] = {}  # samples skipped so far, by reason

    def batches(self, start: Position) -> Iterator[tuple[torch.Tensor, torch.Tensor, Position]]:
        """Batches from `start` on, for ever (epochs roll over)."""
        pixels, tokens, taken = [], [], 0
        for position, shard_pixels, shard_tokens in self._shards(start):
            offset = position.taken
            while offset < len(shard_pixels):
                take = min(self.batch_size - taken, len(shard_pixels) - offset)
                pixels.append(shard_pixels[offset:offset + take])
                tokens.append(shard_tokens[offset:offset + take])
                offset, taken = offset + take, taken + take
                if taken == self.batch_size:
                    ended = offset == len(shard_pixels)  # the next batch starts the next shard
                    after = Position(position.epoch, position.shards, 0 if ended else offset)
                    yield torch.cat(pixels), torch.cat(tokens), after
                    pixels, tokens, taken = [], [], 0

    def _shards(self, start: Position) -> Iterator[tuple[Position, torch.Tensor, torch.Tensor]]:
        """(its position with the pairs to drop, pixels, tokens) of each shard of the stream from `start`, its
        pairs in their drawn order."""
        epoch, begun, drop = start.epoch, start.shards, start.taken
        if drop:  # the shard the last batch ended in is read again
            begun -= 1
        empty_epochs = 0
        while True:
            shards = epoch_shards(self.units, self.seed, epoch, self.stream, self.streams)[begun:]
            usable = 0
            for i, (unit, pixels, tokens) in enumerate(decoded_shards(
                    shards, self.pixels, self.tokenizer, self.reading, self.workers, self.device_type, self.skipped)):
                usable += len(pixels)
                order = torch.randperm(len(pixels), generator=_generator(self.seed, epoch, unit.index))
                yield Position(epoch, begun + i + 1, drop), pixels[order], tokens[order]
                drop = 0
            empty_epochs = 0 if usable else empty_epochs + 1
            if empty_epochs and not begun:
                self._nothing_usable()
            epoch, begun = epoch + 1, 0

    def _nothing_usable(self) -> None:
        if self.skipped.get(str(Reason.NO_CAPTION)) and len(self.skipped) == 1:
            raise UsageError(f"no sample of {param('train_data')} has a caption under "
                             f"{param('caption_key', self.reading.caption_key)}: train needs image-caption pairs")
        reasons = ', '.join(f'{n} {r}' for r, n in sorted(self.skipped.items()))
        raise UsageError(f"no usable image-caption pair in {param('train_data')} ({reasons or 'no sample'})")


def shared_batches(streams: Sequence['Pairs'], starts: Sequence[Position], share: Share) \
        -> Iterator[tuple[torch.Tensor, torch.Tensor, list[Position]]]:
    """This process's part of each step: its streams' batches one after another (cut to its part), and each
    stream's position after it."""
    iterators = [pairs.batches(start) for pairs, start in zip(streams, starts)]
    try:
        for items in zip(*iterators):
            pixels, tokens = torch.cat([i[0] for i in items]), torch.cat([i[1] for i in items])
            if share.parts > 1:
                size = len(pixels) // share.parts
                pixels, tokens = (t[share.part * size:(share.part + 1) * size] for t in (pixels, tokens))
            yield pixels, tokens, [i[2] for i in items]
    finally:
        for iterator in iterators:
            iterator.close()


def decoded_shards(shards: list[Unit], pixels: Pixels, tokenizer, reading: Reading, workers: int, device_type: str,
                   skipped: dict[str, int]) -> Iterator[tuple[Unit, torch.Tensor, torch.Tensor]]:
    """The usable pairs (uint8 pixels, tokens) of each shard, in the shards' order (read by the decoding workers in
    any order), counting the samples skipped by reason into `skipped`."""
    if not shards:
        return
    dataset = UnitDataset(shards, pixels, CHUNK, image_keys=reading.image_keys, caption_key=reading.caption_key,
                          tokenizer=tokenizer, limits=reading.limits, remote=reading.remote)
    workers = min(workers, len(shards))
    decoded = DecodedBatches(dataset, workers, device_type, shm_prefetch(workers, CHUNK * pixels.sample_bytes()),
                             quiet_s=reading.remote.quiet_s(), settle_threads=False)
    held: dict[int, list] = {}
    following = 0
    for batch in decoded:
        if batch.restart:
            held.pop(batch.unit, None)
            continue
        held.setdefault(batch.unit, []).append(batch)
        while following < len(shards) and held.get(shards[following].index) and held[shards[following].index][-1].end:
            chunks = held.pop(shards[following].index)
            for skip in (s for chunk in chunks for s in chunk.skipped):
                skipped[str(skip.reason)] = skipped.get(str(skip.reason), 0) + 1
            kept = [c for c in chunks if c.pixels is not None]
            if kept:
                yield shards[following], torch.cat([c.pixels for c in kept]), torch.cat([c.tokens for c in kept])
            else:
                yield shards[following], torch.empty(0, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
            following += 1
