"""The blocks an EVA-CLIP model is sharded by: every image block and every text block, input to output.

Each model this package builds answers `fsdp_shard_modules()` with them (`open_clip_seam`), the hook that open_clip's
next trainer (its main branch: `open_clip_train --fsdp`) calls to decide what `fully_shard` wraps; without it an EVA
image tower, whose blocks are timm's and not open_clip's, would be gathered whole. `eva-open-clip train --fsdp`
shards by the same list.
"""
from __future__ import annotations

from torch import nn


def shard_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, block) of every image block (`visual.trunk.blocks.N`) and text block (`text.transformer.resblocks.N`,
    or `transformer.resblocks.N` where the text tower is unpacked onto the model), input to output."""
    found = [(f'visual.trunk.blocks.{i}', block) for i, block in enumerate(model.visual.trunk.blocks)]
    text = 'text.' if isinstance(getattr(model, 'text', None), nn.Module) else ''
    owner = model.text if text else model
    found += [(f'{text}transformer.resblocks.{i}', block) for i, block in enumerate(owner.transformer.resblocks)]
    return found
