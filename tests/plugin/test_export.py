"""`eva-open-clip convert`: a plain open_clip folder (hub layout) from a released checkpoint."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import eva_open_clip.convert as export
from support.checkpoints import DATA, golden, needs_open_clip, register_reference, rel_err
from support.cli import run_cli


@needs_open_clip((3, 0), "'local-dir:' loading")
def test_export_tiny_and_load_it_as_a_local_dir(tmp_path, tiny_checkpoint):
    out = export.export_folder(tiny_checkpoint, tmp_path / 'out', model_name=register_reference('tiny_a'))
    assert sorted(p.name for p in out.iterdir()) == ['open_clip_config.json', 'open_clip_model.safetensors']
    config = json.loads((out / 'open_clip_config.json').read_text())
    assert set(config) == {'model_cfg', 'preprocess_cfg'}
    assert config['preprocess_cfg']['mean'] == [0.48145466, 0.4578275, 0.40821073]
    weights = load_file(out / 'open_clip_model.safetensors')
    assert {v.dtype for v in weights.values()} == {torch.float16}  # the checkpoint's dtype
    assert 'visual.trunk.blocks.0.attn.qkv.weight' in weights
    model, _, _ = open_clip.create_model_and_transforms(f'local-dir:{out}')
    g = golden('tiny_a')
    with torch.no_grad():
        assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-4
        assert rel_err(model.encode_text(g['tokens']), g['text_features']) < 1e-4


def test_export_detects_the_model_from_the_keys(tmp_path, tiny_checkpoint):
    name = register_reference('tiny_a')
    state_dict = torch.load(tiny_checkpoint, weights_only=True)
    assert export.detect_model(state_dict) == name
    export.export_folder(tiny_checkpoint, tmp_path / 'out')
    config = json.loads((tmp_path / 'out' / 'open_clip_config.json').read_text())
    assert config['model_cfg']['vision_cfg']['timm_model_name'] == 'evaclip_test_tiny_a'


def test_refuses_a_non_empty_folder_unless_forced(tmp_path, tiny_checkpoint):
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('mine')
    with pytest.raises(FileExistsError, match='force=True'):
        export.export_folder(tiny_checkpoint, out, model_name=register_reference('tiny_a'))
    assert (out / 'keep.txt').read_text() == 'mine'
    export.export_folder(tiny_checkpoint, out, model_name=register_reference('tiny_a'), force=True)
    assert sorted(p.name for p in out.iterdir()) == ['open_clip_config.json', 'open_clip_model.safetensors']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['out']  # no staging folders left


def test_interrupted_export_leaves_no_folder(tmp_path, tiny_checkpoint, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export, 'save_file', interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export_folder(tiny_checkpoint, tmp_path / 'out', model_name=register_reference('tiny_a'))
    assert list(tmp_path.iterdir()) == []


def test_cli_convert_with_a_custom_config(tmp_path, tiny_checkpoint):
    config = tmp_path / 'tiny.json'
    config.write_text(json.dumps(golden('tiny_a')['config']))
    out = tmp_path / 'out'
    result = run_cli('convert', tiny_checkpoint, out, '--model', 'my-tiny', '--config', config)
    assert result.returncode == 0, result.stderr
    assert (out / 'open_clip_model.safetensors').is_file()
    again = run_cli('convert', tiny_checkpoint, out, '--model', 'my-tiny', '--config', config)
    assert again.returncode == 2 and 'Traceback' not in again.stderr
    ours = [line for line in again.stderr.splitlines() if line.startswith('eva-open-clip')]  # not libraries' warnings
    assert ours == [f'eva-open-clip convert: {out} exists and is not empty (use --force to replace it)']


def test_cli_convert_names_the_bad_file(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'not a checkpoint')
    result = run_cli('convert', bad, tmp_path / 'out', '--model', 'EVA_CLIP_g_14')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'eva-open-clip convert: {bad}: ')
    assert not (tmp_path / 'out').exists()


@pytest.mark.full_size
@needs_open_clip((3, 0), "'local-dir:' loading")
def test_g14_export_loads_in_plain_open_clip(tmp_path, g14_checkpoint):
    image_path = DATA / 'images' / 'palette_120.png'
    model, _, preprocess = open_clip.create_model_and_transforms('EVA_CLIP_g_14', pretrained=str(g14_checkpoint))
    tokens = open_clip.get_tokenizer('EVA_CLIP_g_14')(['a palette'])
    with torch.no_grad():
        reference = (model.eval().encode_image(preprocess(Image.open(image_path)).unsqueeze(0)),
                     model.encode_text(tokens))
    del model
    torch.save(reference, tmp_path / 'reference.pt')
    out = tmp_path / 'EVA_CLIP_g_14'
    result = run_cli('convert', g14_checkpoint, out)
    assert result.returncode == 0, result.stderr[-3000:]
    config = json.loads((out / 'open_clip_config.json').read_text())
    assert config['model_cfg']['vision_cfg']['timm_model_name'] == 'eva_giant_patch14_224'
    code = textwrap.dedent(f'''
        import sys, torch, open_clip
        from PIL import Image
        model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out}')
        tokenizer = open_clip.get_tokenizer('local-dir:{out}')
        assert 'eva_open_clip' not in sys.modules
        image, text = torch.load({str(tmp_path / 'reference.pt')!r})
        with torch.no_grad():
            pixels = preprocess(Image.open({str(image_path)!r})).unsqueeze(0)
            assert torch.equal(model.eval().encode_image(pixels), image)
            assert torch.equal(model.encode_text(tokenizer(['a palette'])), text)
        print('identical')
    ''')
    plain = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600,
                           cwd=tmp_path, env=dict(os.environ, PYTHONPATH=''))
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert 'identical' in plain.stdout
