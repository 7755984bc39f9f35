"""The one path of an `embed` job, whichever its writer (an output folder, or one FILE.npy): units decoded in
DataLoader workers by the encoder's host half of the pixel pipeline, encoded, and handed over as float32 rows
that own their memory (a batch's pixels and tokens are let go once encoded, so that nothing a writer keeps
holds page-locked memory); and the shards a job gives up on, found among its units."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from eva_open_clip.embed.inputs import named_identities
from eva_open_clip.embed.loader import Batch, DecodedBatches, UnitDataset, shm_prefetch
from eva_open_clip.embed.remote import RemoteOptions
from eva_open_clip.embed.units import Unit
from eva_open_clip.errors import UsageError, param
from eva_open_clip.runtime.decode import PixelLimits
from eva_open_clip.runtime.defaults import IMAGE_KEYS
from eva_open_clip.runtime.encoder import Encoder


@dataclass(frozen=True)
class Reading:
    """How a job reads its samples: the webdataset keys, captions or not, the pixel limits, remote reads."""

    image_keys: tuple[str, ...] = IMAGE_KEYS
    caption_key: str | None = None  # None: no captions
    limits: PixelLimits = PixelLimits()
    remote: RemoteOptions = RemoteOptions()


class EncodedUnits:
    """(batch, image features, text features) of each batch of `units`, decoded by `workers` processes and
    encoded by `encoder`; `decoded` times the waits for decoded batches (see `DecodedBatches`)."""

    def __init__(self, encoder: Encoder, units: Sequence[Unit], batch_size: int, workers: int, reading: Reading):
        self.encoder = encoder
        pixels = encoder.pixels
        captions = reading.caption_key is not None
        dataset = UnitDataset(units, pixels, batch_size, image_keys=reading.image_keys,
                              caption_key=reading.caption_key, tokenizer=encoder.tokenizer if captions else None,
                              limits=reading.limits, remote=reading.remote)
        workers = min(workers, len(units))  # each worker decodes whole units: more would only start and wait
        self.decoded = DecodedBatches(dataset, workers, encoder.device_type,
                                      shm_prefetch(workers, batch_size * pixels.sample_bytes()),
                                      quiet_s=reading.remote.quiet_s())

    def __iter__(self) -> Iterator[tuple[Batch, np.ndarray | None, np.ndarray | None]]:
        for batch, image, text in self.encoder.encoded(self.decoded):
            batch.pixels = batch.tokens = None
            yield batch, image, text


def named_shards(units: Sequence[Unit], give_up: Sequence[str]) -> dict[int, str]:
    """The units of the shards that `give_up` names ({unit index: the argument}); each must name shards of the
    job's inputs."""
    by_identity = {s.real: unit.index for unit in units if unit.shard is not None for s in unit.sources}
    named: dict[int, str] = {}
    for arg in give_up:
        for identity in named_identities(arg):
            if identity not in by_identity:
                raise UsageError(f"{param('give_up', arg)}: no shard of this job's inputs is {identity}")
            named[by_identity[identity]] = arg
    return named
