"""Everything open_clip users do with a model works with the EVA models (tiny reference configs)."""
from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from support.checkpoints import (
    REFERENCE_CASES,
    golden,
    needs_open_clip,
    needs_timm,
    register_reference,
    rel_err,
    released_state_dict,
)

PRECISIONS = ['fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16', 'amp', 'amp_bf16', 'amp_bfloat16']
AUTOCAST = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp('ckpt')
    paths = {}
    for case in REFERENCE_CASES:
        paths[case] = root / f'{case}.pt'
        torch.save(released_state_dict(case), paths[case])
    return paths


def _encode(model, pixels, tokens, precision):
    input_dtype = open_clip.get_input_dtype(precision) or torch.float32
    autocast = torch.autocast('cpu', dtype=AUTOCAST[precision]) if precision in AUTOCAST else \
        torch.autocast('cpu', enabled=False)
    with torch.no_grad(), autocast:
        return model.encode_image(pixels.to(input_dtype)).float(), model.encode_text(tokens).float()


@functools.lru_cache(maxsize=None)
def _torch_cannot_run(precision: str) -> str:
    """Why this torch's CPU kernels cannot run open_clip's own (non-EVA) models in `precision`, if so."""
    config = {'embed_dim': 16,
              'vision_cfg': {'image_size': 32, 'layers': 1, 'width': 32, 'head_width': 16, 'patch_size': 16},
              'text_cfg': {'context_length': 77, 'vocab_size': 49408, 'width': 16, 'heads': 2, 'layers': 1}}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / 'probe-tiny-vit.json'
        path.write_text(json.dumps(config))
        open_clip.add_model_config(path)
    model = open_clip.create_model('probe-tiny-vit', precision=precision)  # open_clip's own casts
    try:
        _encode(model.eval(), torch.zeros(1, 3, 32, 32), torch.zeros(1, 77, dtype=torch.long), precision)
    except RuntimeError as e:
        return f'torch {torch.__version__} on CPU cannot run open_clip models in {precision}: {str(e)[:120]}'
    return ''


def _load(case, checkpoints, **kwargs):
    return open_clip.create_model(register_reference(case), pretrained=str(checkpoints[case]), **kwargs).eval()


@pytest.mark.parametrize('case', REFERENCE_CASES)
@pytest.mark.parametrize('precision', PRECISIONS)
def test_precisions(case, precision, checkpoints):
    if _torch_cannot_run(precision):
        pytest.skip(_torch_cannot_run(precision))
    model = _load(case, checkpoints, precision=precision)
    g = golden(case)
    image, text = _encode(model, g['pixels'], g['tokens'], precision)
    if precision == 'fp32':
        bound = 1e-3 if case == 'e02_tiny_a' else 1e-4
        assert rel_err(image, g['image_features']) < bound and rel_err(text, g['text_features']) < bound
    else:
        assert F.cosine_similarity(image, g['image_features']).min() > 0.99
        assert F.cosine_similarity(text, g['text_features']).min() > 0.99


def test_output_dict(checkpoints):
    name = register_reference('tiny_a')
    model = open_clip.create_model(name, pretrained=str(checkpoints['tiny_a']), output_dict=True)
    g = golden('tiny_a')
    with torch.no_grad():
        out = model.eval()(g['pixels'], g['tokens'])
    assert set(out) >= {'image_features', 'text_features', 'logit_scale'}
    assert torch.allclose(out['image_features'], F.normalize(g['image_features'], dim=-1), atol=1e-5)
    assert out['logit_scale'].item() == pytest.approx(g['logit_scale'].exp().item(), rel=1e-5)


@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_grad_checkpointing_gives_the_same_gradients(case, checkpoints):
    g = golden(case)

    def grads(checkpointing):
        model = _load(case, checkpoints)
        model.set_grad_checkpointing(checkpointing)
        assert model.visual.trunk.grad_checkpointing == checkpointing
        loss = model.encode_image(g['pixels']).square().sum() + model.encode_text(g['tokens']).square().sum()
        loss.backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) > 50
    for k in plain:
        assert torch.allclose(plain[k], checkpointed[k], rtol=1e-5, atol=1e-7), k


def _trainable(module):
    return {k for k, p in module.named_parameters() if p.requires_grad}


def test_lock_image_tower_leaves_the_last_groups_trainable(checkpoints):
    model = _load('tiny_a', checkpoints)
    model.lock_image_tower(unlocked_groups=0)
    assert not _trainable(model.visual) and _trainable(model.text)
    model = _load('tiny_a', checkpoints)
    # timm's layer groups for Eva, as open_clip uses them: stem, blocks (the last with the final
    # norm), projection head
    model.lock_image_tower(unlocked_groups=1)
    assert _trainable(model.visual) == {'trunk.head.weight', 'trunk.head.bias'}
    model = _load('tiny_a', checkpoints)
    model.lock_image_tower(unlocked_groups=2)
    trainable = _trainable(model.visual)
    assert {'trunk.norm.weight', 'trunk.blocks.1.attn.qkv.weight', 'trunk.head.weight'} <= trainable
    assert not any(k.startswith(('trunk.blocks.0.', 'trunk.patch_embed', 'trunk.pos_embed', 'trunk.cls_token'))
                   for k in trainable)
    model = _load('tiny_a', checkpoints)
    model.lock_image_tower(unlocked_groups=3)
    assert not {'trunk.cls_token', 'trunk.pos_embed'} & _trainable(model.visual)
    assert 'trunk.blocks.0.mlp.fc1.weight' in _trainable(model.visual)


@needs_open_clip((3, 1), 'lock_text_tower')
def test_lock_text_tower(checkpoints):
    model = _load('tiny_a', checkpoints)
    model.lock_text_tower(unlocked_layers=0)
    assert not _trainable(model.text) and _trainable(model.visual)
    model = _load('tiny_a', checkpoints)
    model.lock_text_tower(unlocked_layers=2)
    trainable = _trainable(model.text)
    assert any(k.startswith('transformer.resblocks.1.') for k in trainable)
    assert not any(k.startswith(('transformer.resblocks.0.', 'token_embedding')) for k in trainable)


@pytest.mark.parametrize('case', REFERENCE_CASES)
@needs_open_clip((2, 32), 'forward_intermediates')
def test_forward_intermediates(case, checkpoints):
    model = _load(case, checkpoints)
    g = golden(case)
    with torch.no_grad():
        out = model.forward_intermediates(image=g['pixels'], text=g['tokens'], image_indices=2, text_indices=2)
    grid = g['pixels'].shape[-1] // model.visual.trunk.patch_embed.patch_size[0]
    width = model.visual.trunk.embed_dim
    assert [t.shape for t in out['image_intermediates']] == [(4, width, grid, grid)] * 2
    assert [t.shape for t in out['text_intermediates']] == [(5, 77, 32)] * 2
    tol = 1e-3 if case == 'e02_tiny_a' else 1e-4
    assert rel_err(out['image_features'], F.normalize(g['image_features'], dim=-1)) < tol
    assert rel_err(out['text_features'], F.normalize(g['text_features'], dim=-1)) < tol


@pytest.mark.parametrize('case', REFERENCE_CASES)
@needs_open_clip((3, 0), 'force_image_size with EVA models')
@needs_timm((1, 0, 18), 'force_image_size with EVA models')
def test_force_image_size(case, checkpoints):
    g = golden(case)
    native = g['pixels'].shape[-1]
    same = _load(case, checkpoints, force_image_size=native)
    with torch.no_grad():
        assert rel_err(same.encode_image(g['pixels']), g['image_features']) < (1e-3 if case == 'e02_tiny_a' else 1e-4)
    patch = same.visual.trunk.patch_embed.patch_size[0]
    larger = native + 2 * patch
    model, _, preprocess = open_clip.create_model_and_transforms(
        register_reference(case), pretrained=str(checkpoints[case]), force_image_size=larger)
    trunk = model.visual.trunk
    grid = larger // patch
    assert trunk.pos_embed.shape == (1, 1 + grid * grid, trunk.embed_dim)
    assert preprocess.transforms[0].size == larger
    # the class token's position embedding is kept, the grid is resampled from the checkpoint's
    released = released_state_dict(case)['visual.pos_embed'].float()
    assert torch.equal(trunk.pos_embed[0, 0], released[0, 0])
    image = torch.nn.functional.interpolate(g['pixels'], size=larger, mode='bicubic')
    with torch.no_grad():
        features = model.eval().encode_image(image)
    assert features.shape == g['image_features'].shape and torch.isfinite(features).all()
