"""Registration with open_clip: names, tokenizer, preprocessing, configs, idempotence."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import open_clip
import pytest
import timm
import torch

import eva_open_clip
from eva_open_clip import ConfigError
from eva_open_clip.configs import build_spec
from eva_open_clip.empty_build import empty_build, meta_model
from eva_open_clip.registry import BUILTIN_MODELS, get_eva_model, model_configs_dir
from support.checkpoints import DATA, golden, registered


def test_g14_is_an_open_clip_model():
    assert 'EVA_CLIP_g_14' in open_clip.list_models()
    assert ('EVA_CLIP_g_14', 'laion400m_s11b_b41k') in open_clip.list_pretrained()
    cfg = open_clip.get_pretrained_cfg('EVA_CLIP_g_14', 'laion400m_s11b_b41k')
    assert cfg['hf_hub'] == 'BAAI/EVA/eva_clip_psz14.pt'


def test_g14_tokenizer_is_clip_bpe_with_context_77():
    tokenizer = open_clip.get_tokenizer('EVA_CLIP_g_14')
    assert isinstance(tokenizer, open_clip.SimpleTokenizer)
    assert tokenizer.context_length == 77
    assert tokenizer(['a cat']).shape == (1, 77)


def test_g14_architecture_is_the_released_one():
    spec = get_eva_model('EVA_CLIP_g_14').spec
    kw = spec.timm_kwargs
    assert (kw['embed_dim'], kw['depth'], kw['num_heads'], spec.mlp_hidden, kw['patch_size'], kw['img_size']) == \
        (1408, 40, 16, 6144, 14, 224)
    assert kw['qkv_fused'] and kw['qkv_bias'] and not kw['use_rot_pos_emb']
    assert spec.stock_timm_name() == 'eva_giant_patch14_224'
    text = spec.open_clip_cfg['text_cfg']
    assert (text['width'], text['heads'], text['layers'], text['context_length']) == (768, 12, 12, 77)
    assert spec.open_clip_cfg['vision_cfg']['timm_drop_path'] == 0.4
    assert not spec.open_clip_cfg.get('quick_gelu')


def test_g14_preprocessing_is_the_original():
    with empty_build('meta'):
        _, _, preprocess = open_clip.create_model_and_transforms('EVA_CLIP_g_14', device='meta')
    resize, crop = preprocess.transforms[0], preprocess.transforms[1]
    assert resize.size == 224 and resize.interpolation.value == 'bicubic'
    assert crop.size == (224, 224)
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == (0.48145466, 0.4578275, 0.40821073)
    assert tuple(norm.std) == (0.26862954, 0.26130258, 0.27577711)


def test_drop_path_applies_in_training_mode(tiny_checkpoint):
    model = meta_model('EVA_CLIP_g_14')
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, 'drop_prob') else 0.0 for b in model.visual.trunk.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.4)
    assert rates == sorted(rates)


def test_register_is_idempotent_and_rejects_a_different_config(tmp_path):
    config = golden('tiny_a')['config']
    eva_open_clip.register_eva_model('test-idem', config)
    eva_open_clip.register_eva_model('test-idem', json.loads(json.dumps(config)))
    path = tmp_path / 'cfg.json'
    path.write_text(json.dumps(config))
    eva_open_clip.register_eva_model('test-idem', path)
    changed = json.loads(json.dumps(config))
    changed['vision_cfg']['layers'] = 3
    with pytest.raises(ValueError, match='test-idem'):
        eva_open_clip.register_eva_model('test-idem', changed)
    assert open_clip.list_models().count('test-idem') == 1


def test_builtin_registration_is_idempotent():
    before = open_clip.list_models()
    eva_open_clip.register_builtin_models()
    assert open_clip.list_models() == before


def test_open_clip_names_are_not_taken_over():
    with pytest.raises(ValueError, match='ViT-B-32'):
        eva_open_clip.register_eva_model('ViT-B-32', golden('tiny_a')['config'])


@pytest.mark.parametrize('section,key,value', [
    ('vision_cfg', 'global_average_pool', True),
    ('vision_cfg', 'timm_model_name', 'vit_base_patch16_224'),
    ('text_cfg', 'hf_model_name', 'roberta-base'),
    (None, 'multimodal_cfg', {}),
])
def test_unsupported_config_key_is_named(section, key, value):
    config = json.loads(json.dumps(golden('tiny_a')['config']))
    (config[section] if section else config)[key] = value
    with pytest.raises(eva_open_clip.ConfigError, match=key):
        eva_open_clip.register_eva_model(f'test-bad-{key}', config)
    assert f'test-bad-{key}' not in open_clip.list_models()


def test_builtin_configs_are_found_where_installed():
    configs = model_configs_dir()
    assert sorted(p.stem for p in configs.glob('*.json')) == sorted(r.name for r in BUILTIN_MODELS)
    assert json.loads((configs / 'EVA_CLIP_g_14.json').read_text()) == \
        json.loads((DATA.parent.parent / 'model_configs' / 'EVA_CLIP_g_14.json').read_text())


def test_import_touches_no_network():
    code = (
        'import socket\n'
        'def refuse(*a, **k): raise AssertionError("network used at import")\n'
        'socket.socket.connect = refuse\nsocket.create_connection = refuse\nsocket.getaddrinfo = refuse\n'
        'import eva_open_clip, open_clip\n'
        'assert "EVA_CLIP_g_14" in open_clip.list_models()\n'
    )
    env = dict(os.environ, HF_HUB_OFFLINE='0')
    subprocess.run([sys.executable, '-c', code], check=True, env=env, timeout=300)


def test_spec_translation_of_eva02_configs():
    spec = build_spec(json.loads((model_configs_dir() / 'EVA02-CLIP-L-14-336.json').read_text()), 'x')
    kw = spec.timm_kwargs
    assert kw['use_rot_pos_emb'] and kw['ref_feat_shape'] == (16, 16) and kw['img_size'] == 336
    assert not kw['qkv_fused'] and kw['scale_mlp'] and kw['scale_attn_inner'] and kw['swiglu_mlp']
    assert spec.stock_timm_name() == 'eva02_large_patch14_clip_336'


def test_sizes_may_be_given_as_pairs():
    config = json.loads(json.dumps(golden('tiny_a')['config']))
    config['vision_cfg'].update(image_size=[56, 56], patch_size=[14, 14])
    assert build_spec(config, 'x').timm_kwargs == build_spec(golden('tiny_a')['config'], 'x').timm_kwargs
    config['vision_cfg']['image_size'] = [56, 84]
    with pytest.raises(eva_open_clip.ConfigError, match='image_size'):
        build_spec(config, 'x')


def test_a_model_unregistered_can_be_registered_again_with_another_config(tiny_checkpoint):
    config = golden('tiny_a')['config']
    other = dict(config, embed_dim=config['embed_dim'] * 2)
    with registered('test-reregistered', config) as name:
        model = open_clip.create_model(name, pretrained=str(tiny_checkpoint))
        assert name in open_clip.list_models() and name in eva_open_clip.list_eva_models()
    assert name not in open_clip.list_models() and name not in eva_open_clip.list_eva_models()
    with pytest.raises(ValueError, match='unregistered'):  # timm keeps the entry point, which now refuses
        timm.create_model('evaclip_test_reregistered')
    with registered(name, other):  # the same name, another architecture: built as the new config says
        assert open_clip.create_model(name).text.text_projection.shape[-1] == other['embed_dim']
    with registered(name, config):
        again = open_clip.create_model(name, pretrained=str(tiny_checkpoint))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_released_and_unknown_models_are_not_unregistered():
    with pytest.raises(ConfigError, match="'EVA_CLIP_g_14' is a released EVA-CLIP model"):
        eva_open_clip.unregister_eva_model('EVA_CLIP_g_14')
    with pytest.raises(ConfigError, match="no EVA model named 'never-registered'"):
        eva_open_clip.unregister_eva_model('never-registered')
