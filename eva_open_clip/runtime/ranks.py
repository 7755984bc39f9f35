"""This process's place in a torchrun job (or srun with torchrun's environment), read from the environment
in one place: rank 0 of 1 without one; and the job's process group, started and stopped with it."""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

START_TIMEOUT_S = 'EVA_OPEN_CLIP_START_TIMEOUT_S'  # how long ranks wait for rank 0 to list the inputs
_control_group = None  # the gloo group of a GPU job's Python objects (`Ranks.share`); None: the default group


@dataclass(frozen=True)
class Ranks:
    """The global and the node-local rank and world size. `share` and `gather` are collectives."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @staticmethod
    def launched(environ: Mapping[str, str] = os.environ) -> bool:
        """Whether this process was started by torchrun (or with its environment), even as its only process."""
        return all(name in environ for name in ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT'))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> 'Ranks':
        return cls(int(environ.get('RANK', 0)), int(environ.get('WORLD_SIZE', 1)), int(environ.get('LOCAL_RANK', 0)),
                   int(environ.get('LOCAL_WORLD_SIZE', 1)))

    def share(self, value: Any) -> Any:
        """Rank 0's value, on every rank."""
        if self.world_size == 1:
            return value
        import torch.distributed as dist
        box = [value]
        dist.broadcast_object_list(box, src=0, group=_control_group)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's value, in rank order, on every rank (a collective)."""
        if self.world_size == 1:
            return [value]
        import torch.distributed as dist
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value, group=_control_group)
        return values

    @contextlib.contextmanager
    def process_group(self, device: str | None, alone_too: bool = False) -> Iterator[str | None]:
        """This rank's device (see `devices.rank_device`), inside torch.distributed's process group of the job
        (NCCL on GPUs, else gloo), destroyed on the way out; alone, `device` as it is and no group, unless
        `alone_too` (a torchrun launch of one process whose tool needs a group, as FSDP does). On GPUs the
        job's Python objects go through a gloo group of their own (`share`), so that ranks waiting for rank 0 wait
        on the CPU, not inside an NCCL call holding their GPU."""
        if self.world_size == 1 and not alone_too:
            yield device
            return
        import torch
        import torch.distributed as dist

        from eva_open_clip.runtime.devices import check_device, rank_device
        device = rank_device(device, self.local_rank, self.local_world_size, torch.cuda.is_available())
        check_device(device)
        cuda = bool(device and device.startswith('cuda'))
        if cuda:
            torch.cuda.set_device(device)
        # the only collective waits for rank 0 to list the inputs, which may take a while on a slow file system
        timeout = datetime.timedelta(seconds=float(os.environ.get(START_TIMEOUT_S, 3600)))
        global _control_group
        dist.init_process_group('nccl' if cuda else 'gloo', timeout=timeout)
        try:
            _control_group = dist.new_group(backend='gloo', timeout=timeout) if cuda else None
            yield device
        finally:
            _control_group = None
            dist.destroy_process_group()
