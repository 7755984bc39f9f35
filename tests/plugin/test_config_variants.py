"""Every supported combination of EVA-CLIP config switches builds, and loads its own released layout."""
from __future__ import annotations

import itertools
import json

import open_clip
import pytest
import torch

import eva_open_clip
from eva_open_clip import versions
from eva_open_clip.layout import to_released_key
from support.checkpoints import golden

SWITCHES = ['rope', 'naiveswiglu', 'subln', 'postnorm', 'ls_init_value', 'no_qkv_bias']


def _config(flags):
    config = json.loads(json.dumps(golden('tiny_a')['config']))
    v = config['vision_cfg']
    v.update(drop_path_rate=0.0)
    if 'rope' in flags:
        v.update(rope=True, pt_hw_seq_len=16, intp_freq=True)
    for flag in ('naiveswiglu', 'subln', 'postnorm'):
        if flag in flags:
            v[flag] = True
    if 'ls_init_value' in flags:
        v['ls_init_value'] = 0.1
        config['text_cfg']['ls_init_value'] = 0.1
    if 'no_qkv_bias' in flags:
        v['qkv_bias'] = False
    return config


COMBOS = [c for n in range(len(SWITCHES) + 1) for c in itertools.combinations(SWITCHES, n)
          if not ('postnorm' in c and 'ls_init_value' in c)]


@pytest.mark.parametrize('flags', COMBOS, ids=lambda c: '+'.join(c) or 'plain')
def test_variant_builds_and_round_trips(flags, tmp_path):
    if 'naiveswiglu' in flags and 'subln' not in flags and not versions.timm_at_least((1, 0, 20)):
        pytest.skip(f'a SwiGLU without sub-LN needs timm >= 1.0.20 (installed: {versions.TIMM_VERSION})')
    name = 'test-variant-' + ('-'.join(flags) or 'plain')
    eva_open_clip.register_eva_model(name, _config(flags))
    torch.manual_seed(0)
    source = open_clip.create_model(name).eval()
    swiglu = 'naiveswiglu' in flags
    released = {to_released_key(k, swiglu): v.half() for k, v in source.state_dict().items()}
    released['text.logit_scale'] = released.pop('logit_scale')
    assert not any('.trunk.' in k or 'fc1_g' in k or 'q_proj.bias' in k for k in released)
    torch.save(released, tmp_path / 'ckpt.pt')
    loaded = open_clip.create_model(name, pretrained=str(tmp_path / 'ckpt.pt')).eval()
    g = golden('tiny_a')
    with torch.no_grad():
        a, b = source.half().float().encode_image(g['pixels']), loaded.encode_image(g['pixels'])
    assert torch.allclose(a, b, atol=1e-5)


def test_post_norm_with_layer_scale_is_refused():
    with pytest.raises(eva_open_clip.ConfigError, match='ls_init_value'):
        eva_open_clip.register_eva_model('test-postnorm-ls', _config(('postnorm', 'ls_init_value')))
