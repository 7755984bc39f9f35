"""`convert_state_dict`: a pure, idempotent mapping recognized by key signatures."""
from __future__ import annotations

import torch

from eva_open_clip import convert_state_dict
from eva_open_clip.layout import is_released_layout, unwrap_state_dict
from support.checkpoints import released_state_dict


def test_pure_and_idempotent():
    for case in ('tiny_a', 'e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a'):
        sd = released_state_dict(case)
        keys_before = list(sd)
        once = convert_state_dict(sd)
        assert list(sd) == keys_before  # input untouched
        twice = convert_state_dict(once)
        assert twice == once and twice is not once
        assert all(once[k] is v for k, v in twice.items())  # no tensor copied
        assert not any('.rope.' in k for k in once)


def test_released_names_map_to_open_clip_names():
    once = convert_state_dict(released_state_dict('e02_tiny_a'))
    for key in ('visual.trunk.blocks.0.attn.q_proj.bias', 'visual.trunk.blocks.0.attn.norm.weight',
                'visual.trunk.blocks.1.mlp.fc1_g.weight', 'visual.trunk.blocks.1.mlp.fc1_x.bias',
                'visual.trunk.blocks.1.mlp.fc2.weight', 'visual.trunk.blocks.1.mlp.norm.bias',
                'visual.trunk.head.weight', 'logit_scale', 'text.token_embedding.weight'):
        assert key in once
    tiny = convert_state_dict(released_state_dict('tiny_a'))
    assert 'logit_scale' in tiny and 'visual.trunk.blocks.0.attn.q_bias' in tiny
    assert 'visual.trunk.blocks.0.mlp.fc2.weight' in tiny


def test_signature_and_unwrapping():
    sd = released_state_dict('tiny_a')
    assert is_released_layout(sd) and not is_released_layout(convert_state_dict(sd))
    nested = {'state_dict': {f'module.{k}': v for k, v in sd.items()}, 'epoch': 1}
    assert unwrap_state_dict(nested).keys() == sd.keys()
    assert unwrap_state_dict({'model': sd}).keys() == sd.keys()
    assert unwrap_state_dict({'module': sd}).keys() == sd.keys()
    assert torch.equal(unwrap_state_dict(nested)['visual.cls_token'], sd['visual.cls_token'])
