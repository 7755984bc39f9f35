"""This process's place in a torchrun job (or srun with torchrun's environment), read from the environment
in one place: rank 0 of 1 without one."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping


@dataclass(frozen=True)
class Ranks:
    """The global and the node-local rank and world size. `share` is a collective."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

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
        dist.broadcast_object_list(box, src=0)
        return box[0]
