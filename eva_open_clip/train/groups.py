"""EVA-CLIP's parameter groups: a learning rate per tower, layer-wise decay per tower, and weight decay for all but
1-D tensors, biases and each tower's `no_weight_decay()` (the EVA-CLIP repository's `rei/training/optim.py`).

A tower of L blocks has L + 2 layers: 0 the embeddings (patch and position embeddings, class token; token and
position embeddings of the text), block i is layer i + 1, everything else (final norms, heads, projections) the
top, L + 1. A layer's learning rate is its tower's times decay ** (L + 1 - layer). Parameters of neither tower
(`logit_scale`) take the base rate, undecayed.
"""
from __future__ import annotations

import re
from typing import Any

from torch import nn

EMBEDDINGS = ('patch_embed', 'pos_embed', 'cls_token', 'mask_token', 'conv1', 'positional_embedding',
              'token_embedding', 'class_embedding')  # layer 0, as the repository names them
_BLOCK = re.compile(r'blocks\.(\d+)\.')  # timm's `blocks.N.` and open_clip's `resblocks.N.`
TOWERS = ('visual', 'text')


def _num_layers(tower: nn.Module) -> int:
    """The blocks of a tower: timm's Eva trunk's, or open_clip's text transformer's."""
    trunk = getattr(tower, 'trunk', tower)
    if hasattr(trunk, 'blocks'):
        return len(trunk.blocks)
    return len(tower.transformer.resblocks)


def layer_id(name: str, num_layers: int) -> int:
    """The layer of parameter `name` in a tower of `num_layers` blocks (see the module doc)."""
    if any(embedding in name for embedding in EMBEDDINGS):
        return 0
    block = _BLOCK.search(name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def _no_weight_decay(model: nn.Module, tower: str) -> set[str]:
    """The tower's own list of tensors without weight decay, as full parameter names."""
    module = getattr(model, tower)
    trunk = getattr(module, 'trunk', None)
    if trunk is not None and hasattr(trunk, 'no_weight_decay'):
        return {f'{tower}.trunk.{n}' for n in trunk.no_weight_decay()}
    if hasattr(module, 'no_weight_decay'):
        return {f'{tower}.{n}' for n in module.no_weight_decay()}
    return {f'{tower}.positional_embedding'} if tower == 'text' else set()


def param_groups(model: nn.Module, lr: float, weight_decay: float, visual_lr: float | None = None,
                 text_lr: float | None = None, visual_layer_decay: float = 1.0,
                 text_layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """The parameter groups of an EVA-CLIP model (any this package builds, LoRA-adapted or not) by the repository's
    rule: each a dict with `params`, `lr` (its tower's rate times its layer's scale), `lr_scale`, `weight_decay`,
    and `tower` and `layer` saying where it sits; frozen parameters are left out (a LoRA-adapted model's adapters
    sit in their blocks' layers). For torch's and timm's optimizers (and schedulers that set each group's rate
    from its initial one)."""
    rates = {'visual': lr if visual_lr is None else visual_lr, 'text': lr if text_lr is None else text_lr}
    decays = {'visual': visual_layer_decay, 'text': text_layer_decay}
    layers = {t: _num_layers(getattr(model, t)) for t in TOWERS if hasattr(model, t)}
    skip = set().union(*(_no_weight_decay(model, t) for t in layers))
    groups: dict[tuple, dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        tower = next((t for t in layers if name.startswith(f'{t}.')), 'other')
        decay = weight_decay if not (param.ndim <= 1 or name.endswith('.bias') or name in skip) else 0.0
        if tower == 'other':
            layer, scale, rate = None, 1.0, lr
        else:
            top = layers[tower] + 1
            layer = layer_id(name, layers[tower]) if decays[tower] < 1.0 else None
            scale = decays[tower] ** (top - layer) if layer is not None else 1.0
            rate = rates[tower]
        key = (tower, layer, decay)
        if key not in groups:
            groups[key] = dict(params=[], lr=rate * scale, lr_scale=scale, weight_decay=decay, tower=tower,
                               layer=layer)
        groups[key]['params'].append(param)
    return list(groups.values())
