"""Every released EVA-CLIP model: architectures, layouts and parity with the EVA-CLIP code."""
from __future__ import annotations

import json

import open_clip
import pytest
import torch
from PIL import Image

import eva_open_clip
from eva_open_clip.empty_build import empty_build, meta_model
from eva_open_clip.registry import BUILTIN_MODELS, model_configs_dir
from support.checkpoints import (
    DATA,
    eva_clip_rope_tables,
    full_size_checkpoint,
    golden,
    manifest,
    needs_open_clip,
    register_reference,
    rel_err,
    released_state_dict,
)

FAMILY = [r.name for r in BUILTIN_MODELS]
# parity bounds of the acceptance tests: EVA02 files store fp16 rotary tables, timm computes them in fp32
TOLERANCE = {'tiny_a': 1e-4, 'epost_tiny_a': 1e-4, 'e02_tiny_a': 1e-3, 'rms_tiny_a': 1e-4, 'rmspost_tiny_a': 1e-4}
LARGEST = ['EVA-CLIP-8B', 'EVA-CLIP-8B-448', 'EVA-CLIP-18B']  # no stock timm architecture


def _features(model, case):
    g = golden(case)
    with torch.no_grad():
        return model.eval().encode_image(g['pixels']), model.encode_text(g['tokens'])


def _load(case, sd, tmp_path, name='ckpt.pt'):
    path = tmp_path / name
    torch.save(sd, path)
    return open_clip.create_model(register_reference(case), pretrained=str(path))


@pytest.mark.parametrize('case', ['e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a'])
@pytest.mark.parametrize('variant', ['as_released', 'logit_scale_under_text', 'no_rotary_tables', 'bf16', 'nested'])
def test_parity_with_eva_clip_code(case, variant, tmp_path):
    sd = released_state_dict(case)
    g = golden(case)
    tol = TOLERANCE[case]
    if variant == 'logit_scale_under_text':
        sd['text.logit_scale'] = sd.pop('logit_scale')
    elif variant == 'no_rotary_tables':
        sd = {k: v for k, v in sd.items() if '.rope.' not in k}
    elif variant == 'bf16':
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
        tol = 2e-2  # the weights themselves are rounded to bf16
    elif variant == 'nested':
        sd = {'state_dict': {f'module.{k}': v for k, v in sd.items()}}
    model = _load(case, sd, tmp_path)
    image, text = _features(model, case)
    assert rel_err(image, g['image_features']) < tol
    assert rel_err(text, g['text_features']) < tol
    assert model.logit_scale.item() == pytest.approx(g['logit_scale'].item(), rel=1e-2)


def test_eva02_preprocessing_and_tokens():
    g = golden('e02_tiny_a')
    _, _, preprocess = open_clip.create_model_and_transforms(register_reference('e02_tiny_a'))
    pixels = torch.stack([preprocess(Image.open(DATA / 'images' / n)) for n in g['image_names']])
    assert (pixels - g['pixels']).abs().max() < 1e-5
    assert torch.equal(open_clip.get_tokenizer(register_reference('e02_tiny_a'))(g['captions']), g['tokens'])


def test_rotary_formula_matches_the_released_tables():
    sd = released_state_dict('e02_tiny_a')
    cos, sin = eva_clip_rope_tables(head_dim=16, grid=4, pt_seq_len=16)
    assert (cos - sd['visual.rope.freqs_cos'].float()).abs().max() < 1e-3
    assert (sin - sd['visual.blocks.1.attn.rope.freqs_sin'].float()).abs().max() < 1e-3


def test_rotary_tables_of_another_grid_are_an_error(tmp_path):
    config = json.loads(json.dumps(golden('e02_tiny_a')['config']))
    config['vision_cfg']['pt_hw_seq_len'] = 8
    eva_open_clip.register_eva_model('test-e02-grid8', config)
    path = tmp_path / 'e02.pt'
    torch.save(released_state_dict('e02_tiny_a'), path)
    with pytest.raises(eva_open_clip.CheckpointError, match=r"rotary table 'visual\.rope\.freqs_cos'"):
        open_clip.create_model('test-e02-grid8', pretrained=str(path))


@pytest.mark.parametrize('name', FAMILY)
def test_released_manifest_matches_the_model_exactly(name):
    released = manifest(name)
    model = meta_model(name)
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert eva_open_clip.convert_state_dict(released) == expected


@pytest.mark.parametrize('name', FAMILY)
def test_family_preprocessing(name):
    with empty_build('meta'):
        _, _, preprocess = open_clip.create_model_and_transforms(name, device='meta')
    size = json.loads((model_configs_dir() / f'{name}.json').read_text())['vision_cfg']['image_size']
    assert size == {'EVA02-CLIP-L-14-336': 336, 'EVA-CLIP-8B-448': 448}.get(name, 224)
    assert preprocess.transforms[0].size == size and preprocess.transforms[1].size == (size, size)
    assert tuple(preprocess.transforms[-1].mean) == (0.48145466, 0.4578275, 0.40821073)
    assert len([t for t in open_clip.list_pretrained() if t[0] == name]) == 1


def test_shipped_configs_are_the_eva_clip_ones():
    for name in FAMILY:
        cfg = json.loads((model_configs_dir() / f'{name}.json').read_text())
        assert set(cfg) == {'embed_dim', 'vision_cfg', 'text_cfg'}


@pytest.mark.full_size
@pytest.mark.parametrize('name', ['EVA02-CLIP-B-16', 'EVA02-CLIP-L-14'])
def test_full_size_eva02_loads_and_encodes(name, tmp_path):
    sd = full_size_checkpoint(name)
    path = tmp_path / f'{name}.pt'
    torch.save(sd, path)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(path))
    trunk = model.visual.trunk
    last = len(trunk.blocks) - 1
    assert torch.equal(trunk.blocks[-1].mlp.fc1_g.weight, sd[f'visual.blocks.{last}.mlp.w1.weight'].float())
    assert torch.equal(trunk.blocks[0].attn.q_proj.bias, sd['visual.blocks.0.attn.q_bias'].float())
    image = preprocess(Image.open(DATA / 'images' / 'gradient_rgb_300x200.png')).unsqueeze(0)
    with torch.no_grad():
        features = model.eval().encode_image(image)
        text = model.encode_text(open_clip.get_tokenizer(name)(['a gradient']))
    assert torch.isfinite(features).all() and torch.isfinite(text).all()
    embed_dim = json.loads((model_configs_dir() / f'{name}.json').read_text())['embed_dim']
    assert features.shape[-1] == text.shape[-1] == embed_dim


@pytest.mark.parametrize('name', [n for n in FAMILY if n not in LARGEST])
def test_stock_timm_architecture_is_the_same_model(name):
    import timm

    from eva_open_clip.registry import get_eva_model
    spec = get_eva_model(name).spec
    stock = spec.stock_timm_name()
    assert stock is not None
    ours = meta_model(name).visual.trunk
    with empty_build('meta'):
        theirs = timm.create_model(stock, pretrained=False, num_classes=spec.open_clip_cfg['embed_dim'],
                                   global_pool='token')
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert [type(b).__name__ for b in ours.blocks] == [type(b).__name__ for b in theirs.blocks]
    assert getattr(ours.rope, 'ref_feat_shape', None) == getattr(theirs.rope, 'ref_feat_shape', None)
    assert ours.patch_embed.img_size == theirs.patch_embed.img_size


@pytest.mark.parametrize('case', ['e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a'])
@needs_open_clip((3, 0), "'local-dir:' loading")
def test_export_of_eva02_and_post_norm_layouts(case, tmp_path):
    from eva_open_clip.convert import export_folder
    path = tmp_path / 'ckpt.pt'
    torch.save(released_state_dict(case), path)
    out = export_folder(path, tmp_path / 'out', model_name=register_reference(case))
    model = open_clip.create_model(f'local-dir:{out}')
    image, text = _features(model, case)
    assert rel_err(image, golden(case)['image_features']) < TOLERANCE[case]
    assert rel_err(text, golden(case)['text_features']) < TOLERANCE[case]


def test_largest_models_have_no_stock_timm_architecture_and_say_so():
    from eva_open_clip.registry import get_eva_model
    for name in LARGEST:
        spec = get_eva_model(name).spec
        assert spec.stock_timm_name() is None
        assert spec.timm_kwargs['norm'] == 'rmsnorm' and spec.timm_kwargs['head_bias'] is False
    assert get_eva_model('EVA-CLIP-18B').spec.timm_kwargs['use_post_norm'] is True
    assert get_eva_model('EVA-CLIP-8B').spec.timm_kwargs['use_post_norm'] is False


@pytest.mark.parametrize('case', ['rms_tiny_a', 'rmspost_tiny_a'])
def test_bias_free_head_loads_strictly_without_invented_keys(case, tmp_path):
    from safetensors import safe_open

    from eva_open_clip.convert import WEIGHTS_NAME, export_folder
    sd = released_state_dict(case)
    assert 'visual.head.weight' in sd and 'visual.head.bias' not in sd
    model = _load(case, dict(sd), tmp_path)
    assert model.visual.trunk.head.bias is None
    assert all('.bias' not in k for k in model.state_dict() if '.head.' in k or k.endswith('norm.weight'))
    with pytest.raises(eva_open_clip.CheckpointError) as info:  # a head bias is not this model's
        _load(case, dict(sd, **{'visual.head.bias': torch.zeros(32, dtype=torch.float16)}), tmp_path, 'extra.pt')
    assert "1 unexpected key(s): 'visual.head.bias'" in str(info.value) and 'missing' not in str(info.value)
    del sd['visual.head.weight']
    with pytest.raises(eva_open_clip.CheckpointError) as info:
        _load(case, sd, tmp_path, 'missing.pt')
    assert "1 missing key(s): 'visual.head.weight'" in str(info.value) and 'head.bias' not in str(info.value)
    path = tmp_path / 'full.pt'
    torch.save(released_state_dict(case), path)
    out = export_folder(path, tmp_path / 'exported', model_name=register_reference(case))
    with safe_open(str(out / WEIGHTS_NAME), 'pt') as f:
        keys = set(f.keys())
    assert 'visual.trunk.head.weight' in keys and not any(k.endswith(('head.bias', 'norm.bias')) and 'visual' in k
                                                           for k in keys)


def test_rms_norm_is_the_eva_clip_18b_formula():
    """weight * x * rsqrt(mean(x**2) + 1e-6), the formula of the EVA-CLIP-18B code."""
    model = open_clip.create_model(register_reference('rms_tiny_a'))
    norm = model.visual.trunk.blocks[0].norm1
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, 64) * 3, torch.randn(64)
    with torch.no_grad():
        norm.weight.copy_(w)
        expected = w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        assert torch.allclose(norm(x), expected, rtol=1e-6, atol=1e-6)
