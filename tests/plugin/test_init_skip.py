"""Random initialization is skipped exactly when a checkpoint will overwrite every weight."""
from __future__ import annotations

import json

import open_clip
import open_clip.factory as oc_factory
import pytest
import torch

from eva_open_clip import convert_state_dict
from support.checkpoints import golden, needs_open_clip, register_reference, rel_err, released_state_dict

original_create_model = oc_factory.create_model.__wrapped__  # open_clip's own, without our seam


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rng_after(build):
    torch.manual_seed(0)
    build()
    return torch.randn(16)


def test_without_a_checkpoint_the_model_is_initialized_as_before():
    name = register_reference('tiny_a')
    torch.manual_seed(0)
    ours = _state(open_clip.create_model(name))
    torch.manual_seed(0)
    theirs = _state(original_create_model(name))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    qkv = ours['visual.trunk.blocks.0.attn.qkv.weight']
    assert 0.01 < qkv.std() < 0.03  # timm's trunc_normal(std=.02), not an empty allocation


@pytest.mark.parametrize('precision', ['fp32', 'bf16', 'pure_bf16'])
def test_with_a_checkpoint_no_tower_is_initialized(tiny_checkpoint, precision):
    name = register_reference('tiny_a')
    untouched = _rng_after(lambda: None)
    with_checkpoint = _rng_after(lambda: open_clip.create_model(name, pretrained=str(tiny_checkpoint),
                                                                precision=precision))
    without_checkpoint = _rng_after(lambda: open_clip.create_model(name))
    assert torch.equal(with_checkpoint, untouched)  # neither tower drew a random number
    assert not torch.equal(without_checkpoint, untouched)


@pytest.mark.parametrize('precision', ['fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16'])
def test_empty_build_gives_open_clips_dtypes_and_the_checkpoints_values(tiny_checkpoint, precision):
    """Each tensor is created in the dtype open_clip's precision gives it, holding the file's value."""
    name = register_reference('tiny_a')
    ours = open_clip.create_model(name, pretrained=str(tiny_checkpoint), precision=precision)
    reference = original_create_model(name, precision=precision)  # open_clip's own placement and casts
    reference.load_state_dict(convert_state_dict(released_state_dict('tiny_a')) | {
        'logit_scale': released_state_dict('tiny_a')['text.logit_scale']})
    theirs = reference.state_dict()
    assert ours.state_dict().keys() == theirs.keys()
    for key, value in ours.state_dict().items():
        assert value.dtype == theirs[key].dtype, key
        assert value.device.type == 'cpu', key
        assert torch.equal(value, theirs[key]), key
    assert all(type(p) is torch.nn.Parameter for p in ours.parameters())
    buffers, their_buffers = dict(ours.named_buffers()), dict(reference.named_buffers())
    assert buffers.keys() == their_buffers.keys() and buffers  # causal mask, fixed zero k bias
    for key, value in buffers.items():
        assert value.dtype == their_buffers[key].dtype and torch.equal(value, their_buffers[key]), key
    if precision == 'fp32':
        g = golden('tiny_a')
        with torch.no_grad():
            assert rel_err(ours.eval().encode_image(g['pixels']), g['image_features']) < 1e-4


@needs_open_clip((3, 0), 'create_model(load_weights=...)')
def test_load_weights_false_initializes(tiny_checkpoint):
    name = register_reference('tiny_a')
    torch.manual_seed(0)
    ours = _state(open_clip.create_model(name, pretrained=str(tiny_checkpoint), load_weights=False))
    torch.manual_seed(0)
    theirs = _state(original_create_model(name))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_non_eva_models_are_untouched(tmp_path):
    config = {'embed_dim': 32, 'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 64, 'patch_size': 16},
              'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 32, 'heads': 4, 'layers': 1}}
    (tmp_path / 'test-tiny-vit.json').write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / 'test-tiny-vit.json')
    torch.manual_seed(1)
    source = open_clip.create_model('test-tiny-vit')
    torch.save(source.state_dict(), tmp_path / 'vit.pt')
    for seed in (2, 3):
        torch.manual_seed(seed)
        ours = _state(open_clip.create_model('test-tiny-vit'))
        torch.manual_seed(seed)
        theirs = _state(original_create_model('test-tiny-vit'))
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    loaded = open_clip.create_model('test-tiny-vit', pretrained=str(tmp_path / 'vit.pt'))
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in source.state_dict().items())
