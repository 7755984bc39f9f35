"""The model `eva_clip`'s callers get: this package's open_clip EVA model, whose image tower also answers as the
repository's `EVAVisionTransformer` does (`EvaVisionTower`).

It is the same module tree (the same weights, loader, precisions and state-dict keys as open_clip's model);
only the image tower's class is changed, so that its forward takes `return_all_features`, `return_hidden`
(the extension PuLID's copy adds) and `shuffle`, and it carries the attributes those callers read.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from open_clip.timm_model import TimmModel
from torch import nn

HIDDEN_BLOCKS = (4, 8, 12, 16, 20)  # the blocks whose inputs `return_hidden` gives (PuLID's ID encoder reads them)


class EvaVisionTower(TimmModel):
    """open_clip's timm image tower of an EVA model, answering as `eva_clip`'s `EVAVisionTransformer`.

    `image_size` is an int, `image_mean` and `image_std` the normalization of the model's transform.
    """

    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.trunk.blocks

    def get_num_layers(self) -> int:
        return len(self.trunk.blocks)

    def forward(self, x: torch.Tensor, return_all_features: bool = False, return_hidden: bool = False,
                shuffle: bool = False):
        """The projected image feature; with `return_hidden`, also the tokens entering blocks 4, 8, 12, 16 and 20
        (class token first, no norm); with `return_all_features`, instead every token after the last block,
        before the final norm. `shuffle` adds the positional embeddings of the patches in a random order."""
        entering: list[torch.Tensor] = []
        last: list[torch.Tensor] = []
        hooks = [self.trunk.blocks[i].register_forward_pre_hook(lambda _m, args: entering.append(args[0]))
                 for i in HIDDEN_BLOCKS if return_hidden and i < len(self.trunk.blocks)]
        if return_all_features:
            hooks.append(self.trunk.blocks[-1].register_forward_hook(lambda _m, _a, out: last.append(out)))
        try:
            with _shuffled_positions(self.trunk) if shuffle else contextlib.nullcontext():
                features = super().forward(x)
        finally:
            for hook in hooks:
                hook.remove()
        if return_all_features:
            return last[0]
        return (features, entering) if return_hidden else features


@contextlib.contextmanager
def _shuffled_positions(trunk: nn.Module) -> Iterator[None]:
    """The trunk's positional embedding with its patch positions in a random order (the class token's first), as
    `EVAVisionTransformer.forward_features(shuffle=True)` adds it."""
    original = trunk._parameters.pop('pos_embed')
    order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(original.shape[1] - 1) + 1])
    trunk.pos_embed = original[:, order.to(original.device)]
    try:
        yield
    finally:
        del trunk.pos_embed
        trunk._parameters['pos_embed'] = original


def as_eva_clip_model(model: nn.Module, mean: tuple, std: tuple) -> nn.Module:
    """`model` (an open_clip EVA model, changed in place) with the image tower of `EvaVisionTower`."""
    visual = model.visual
    visual.__class__ = EvaVisionTower
    size = visual.image_size
    visual.image_size = size[0] if isinstance(size, (tuple, list)) else size
    visual.image_mean, visual.image_std = tuple(mean), tuple(std)
    return model
