"""The acceptance test: outputs of the original implementation on the reference checkpoints."""
from __future__ import annotations

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from support.checkpoints import DATA, golden, register_reference, rel_err, released_state_dict


def _features(model, case):
    g = golden(case)
    model.eval()
    with torch.no_grad():
        return model.encode_image(g['pixels']), model.encode_text(g['tokens'])


def test_tokenizer_matches_original_tokens():
    g = golden('tiny_a')
    tokenizer = open_clip.get_tokenizer('EVA_CLIP_g_14')
    assert tokenizer.context_length == 77
    assert torch.equal(tokenizer(g['captions']), g['tokens'])


@pytest.mark.parametrize('case', ['tiny_a', 'e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a'])
def test_preprocessing_matches_original_pixels(case, tiny_checkpoint):
    g = golden(case)
    _, _, preprocess = open_clip.create_model_and_transforms(register_reference(case))
    pixels = torch.stack([preprocess(Image.open(DATA / 'images' / n)) for n in g['image_names']])
    assert (pixels - g['pixels']).abs().max().item() < 1e-5


def _write(sd, path, nesting=None, prefix=''):
    sd = {prefix + k: v for k, v in sd.items()}
    if path.suffix == '.safetensors':
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({nesting: sd, 'epoch': 3} if nesting else sd, path)
    return path


LAYOUTS = [
    ('bare.pt', None, ''),
    ('nested_model.pt', 'model', ''),
    ('nested_module.pth', 'module', ''),
    ('nested_state_dict.pt', 'state_dict', ''),
    ('prefixed.pt', None, 'module.'),
    ('nested_prefixed.pt', 'state_dict', 'module.'),
    ('bare.safetensors', None, ''),
]


@pytest.mark.parametrize('filename,nesting,prefix', LAYOUTS)
@pytest.mark.parametrize('dtype', [torch.float16, torch.float32])
def test_every_layout_gives_original_features(tmp_path, filename, nesting, prefix, dtype):
    sd = {k: v.to(dtype) for k, v in released_state_dict('tiny_a').items()}
    path = _write(sd, tmp_path / filename, nesting, prefix)
    model, _, _ = open_clip.create_model_and_transforms(register_reference('tiny_a'), pretrained=str(path))
    image, text = _features(model, 'tiny_a')
    g = golden('tiny_a')
    assert rel_err(image, g['image_features']) < 1e-4
    assert rel_err(text, g['text_features']) < 1e-4
    assert model.logit_scale.item() == pytest.approx(g['logit_scale'].item())


def test_bf16_file_loads_its_values_exactly(tmp_path):
    sd = {k: v.to(torch.bfloat16) for k, v in released_state_dict('tiny_a').items()}
    path = _write(sd, tmp_path / 'bf16.pt')
    model = open_clip.create_model(register_reference('tiny_a'), pretrained=str(path))
    assert torch.equal(model.visual.trunk.blocks[1].attn.qkv.weight, sd['visual.blocks.1.attn.qkv.weight'].float())
    assert torch.equal(model.text.text_projection, sd['text.text_projection'].float())
    image, _ = _features(model, 'tiny_a')
    cos = torch.nn.functional.cosine_similarity(image, golden('tiny_a')['image_features']).min()
    assert cos > 0.99


@pytest.mark.parametrize('factory', ['create_model_and_transforms', 'create_model', 'create_model_from_pretrained'])
def test_every_open_clip_factory(factory, tiny_checkpoint):
    out = getattr(open_clip, factory)(register_reference('tiny_a'), pretrained=str(tiny_checkpoint))
    model = out[0] if isinstance(out, tuple) else out
    image, text = _features(model, 'tiny_a')
    assert rel_err(image, golden('tiny_a')['image_features']) < 1e-4
    assert rel_err(text, golden('tiny_a')['text_features']) < 1e-4


def test_logit_scale_at_top_level(tmp_path):
    sd = released_state_dict('tiny_a')
    sd['logit_scale'] = sd.pop('text.logit_scale')
    model = open_clip.create_model(register_reference('tiny_a'), pretrained=str(_write(sd, tmp_path / 'top.pt')))
    assert model.logit_scale.item() == pytest.approx(golden('tiny_a')['logit_scale'].item())
