"""`param_groups` against the EVA-CLIP repository's rule (rei/training/optim.py), written out here as that code
states it: layer 0 the embeddings, block i layer i + 1, the rest the top; scale decay ** (L + 1 - layer); no
weight decay on 1-D tensors, biases and each tower's no_weight_decay(); the towers' own rates, the base rate for
the rest. On EVA01 and EVA02 towers, with and without layer decay, and usable by torch's and timm's optimizers."""
from __future__ import annotations

import re

import open_clip
import pytest
import torch

from eva_open_clip.train import param_groups
from support.checkpoints import register_reference


def _repository_layer(name: str, num_max_layer: int) -> int:
    layer_0 = {'patch_embed', 'pos_embed', 'cls_token', 'mask_token', 'conv1', 'positional_embedding',
               'token_embedding', 'transformer.embeddings.word_embeddings',
               'transformer.embeddings.position_embeddings', 'transformer.embeddings.token_type_embeddings',
               'class_embedding'}
    if any(part in name for part in layer_0):
        return 0
    block = re.search(r'blocks\.([0-9]+)\.', name)
    layer = re.search(r'layer\.([0-9]+)\.', name)
    if block is not None:
        return int(block.group(1)) + 1
    if layer is not None:
        return int(layer.group(1)) + 1
    return num_max_layer - 1


def _repository_rule(model, lr, wd, visual_lr, text_lr, visual_ld, text_ld) -> dict[str, tuple]:
    """{parameter name: (lr, weight_decay)} as the repository's get_all_parameters and its scheduler give them."""
    rule = {}
    skip = {f'visual.trunk.{n}' for n in model.visual.trunk.no_weight_decay()} | {'text.positional_embedding'}
    depth = {'visual': len(model.visual.trunk.blocks), 'text': len(model.text.transformer.resblocks)}
    for name, param in model.named_parameters():
        tower = name.split('.')[0] if name.split('.')[0] in depth else 'other'
        rate = {'visual': visual_lr, 'text': text_lr}.get(tower, lr)
        ld = {'visual': visual_ld, 'text': text_ld}.get(tower, 1.0)
        scale = 1.0
        if ld < 1.0:
            values = [ld ** (depth[tower] + 1 - i) for i in range(depth[tower] + 2)]
            scale = values[_repository_layer(name, len(values))]
        decay = 0.0 if param.ndim <= 1 or name.endswith('.bias') or name in skip else wd
        rule[name] = (rate * scale, decay)
    return rule


@pytest.mark.parametrize('case', ['tiny_a', 'e02_tiny_a'])
@pytest.mark.parametrize('decays', [(0.9, 0.75), (1.0, 1.0), (0.85, 1.0)])
def test_the_groups_follow_the_repositorys_rule(case, decays):
    model = open_clip.create_model(register_reference(case))
    args = dict(lr=1e-4, weight_decay=0.05, visual_lr=4e-4, text_lr=4e-5, visual_layer_decay=decays[0],
                text_layer_decay=decays[1])
    groups = param_groups(model, **args)
    names = {id(p): n for n, p in model.named_parameters()}
    ours = {names[id(p)]: (g['lr'], g['weight_decay']) for g in groups for p in g['params']}
    expected = _repository_rule(model, 1e-4, 0.05, 4e-4, 4e-5, *decays)
    assert ours.keys() == expected.keys()
    for name, (rate, decay) in expected.items():
        assert ours[name][0] == pytest.approx(rate, rel=1e-12) and ours[name][1] == decay, name
    for g in groups:
        base = {'visual': 4e-4, 'text': 4e-5, 'other': 1e-4}[g['tower']]
        assert g['lr'] == pytest.approx(base * g['lr_scale'], rel=1e-12)
    # the top of a decayed tower has its tower's full rate, its embeddings decay ** (L + 1)
    depth = len(model.visual.trunk.blocks)
    assert ours['visual.trunk.patch_embed.proj.weight'][0] == pytest.approx(4e-4 * decays[0] ** (depth + 1))
    assert ours['visual.trunk.pos_embed'][1] == 0.0 and ours['text.positional_embedding'][1] == 0.0


def test_frozen_parameters_are_left_out_and_the_optimizers_take_the_groups():
    from timm.optim import Lamb
    model = open_clip.create_model(register_reference('e02_tiny_a'))
    model.lock_image_tower()
    groups = param_groups(model, 1e-4, 0.05, visual_layer_decay=0.9, text_layer_decay=0.8)
    assert all(g['tower'] != 'visual' for g in groups)
    assert sum(len(g['params']) for g in groups) == sum(p.requires_grad for p in model.parameters())
    for optimizer in (torch.optim.AdamW(groups), Lamb(groups)):
        assert [g['lr'] for g in optimizer.param_groups] == [g['lr'] for g in groups]
