"""Random initialization is skipped exactly when a checkpoint will overwrite every weight."""
from __future__ import annotations

import json

import open_clip
import open_clip.factory as oc_factory
import torch

from eva_open_clip.registry import get_eva_model
from conftest import golden, model_name, rel_err

original_create_model = oc_factory.create_model.__wrapped__  # open_clip's own, without our seam


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _rng_after(build):
    torch.manual_seed(0)
    build()
    return torch.randn(16)


def test_without_a_checkpoint_the_model_is_initialized_as_before():
    name = model_name('tiny_a')
    torch.manual_seed(0)
    ours = _state(open_clip.create_model(name))
    torch.manual_seed(0)
    theirs = _state(original_create_model(name))
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    qkv = ours['visual.trunk.blocks.0.attn.qkv.weight']
    assert 0.01 < qkv.std() < 0.03  # timm's trunc_normal(std=.02), not an empty allocation


def test_with_a_checkpoint_the_image_tower_is_not_initialized(tiny_checkpoint):
    name = model_name('tiny_a')
    spec = get_eva_model(name).spec
    text_only = _rng_after(lambda: open_clip.model._build_text_tower(spec.open_clip_cfg['embed_dim'],
                                                                      spec.open_clip_cfg['text_cfg']))
    with_checkpoint = _rng_after(lambda: open_clip.create_model(name, pretrained=str(tiny_checkpoint)))
    without_checkpoint = _rng_after(lambda: open_clip.create_model(name))
    assert torch.equal(with_checkpoint, text_only)  # only the text tower drew random numbers
    assert not torch.equal(without_checkpoint, text_only)
    model = open_clip.create_model(name, pretrained=str(tiny_checkpoint))
    g = golden('tiny_a')
    with torch.no_grad():
        assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-4


def test_load_weights_false_initializes(tiny_checkpoint):
    name = model_name('tiny_a')
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
