"""The `eva-open-clip` command end to end (subprocess), on a generated EVA02-CLIP-B-16 checkpoint."""
from __future__ import annotations

import json

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from eva_open_clip.classify import BUNDLED_IMAGE
from support.checkpoints import DATA
from support.cli import run_cli

B16 = ['--model', 'EVA02-CLIP-B-16', '--device', 'cpu']


@pytest.fixture(scope='module')
def b16(b16_checkpoint):
    model, preprocess = open_clip.create_model_from_pretrained('EVA02-CLIP-B-16', pretrained=str(b16_checkpoint))
    return model.eval(), preprocess, open_clip.get_tokenizer('EVA02-CLIP-B-16')


def _features(b16, paths):
    model, preprocess, _ = b16
    with torch.no_grad():
        return model.encode_image(torch.stack([preprocess(Image.open(p)) for p in paths]), normalize=True)


@pytest.mark.parametrize('entry,command', [('console', []), ('console', ['classify']), ('console', ['embed']),
                                           ('console', ['convert']), ('console', ['run']), ('console', ['models']),
                                           ('module', [])])
def test_help(entry, command):
    result = run_cli(*command, '--help', entry=entry)
    assert result.returncode == 0 and 'usage: eva-open-clip' in result.stdout


def test_classify_default_is_the_readme_example(b16_checkpoint, b16):
    result = run_cli('classify', '--pretrained', b16_checkpoint, *B16, '--json')
    assert result.returncode == 0, result.stderr
    [entry] = json.loads(result.stdout)
    assert entry['image'] == str(BUNDLED_IMAGE)
    assert sorted(x['label'] for x in entry['labels']) == ['a cat', 'a diagram', 'a dog']
    model, _, tokenizer = b16
    with torch.no_grad():
        text = model.encode_text(tokenizer(['a diagram', 'a dog', 'a cat']), normalize=True)
    expected = (model.logit_scale.exp() * _features(b16, [BUNDLED_IMAGE]) @ text.T).softmax(-1)[0]
    got = {x['label']: x['prob'] for x in entry['labels']}
    assert [got['a diagram'], got['a dog'], got['a cat']] == pytest.approx(expected.tolist(), abs=1e-5)
    assert [x['prob'] for x in entry['labels']] == sorted(got.values(), reverse=True)


def test_classify_table_top_k_template_and_labels_file(tmp_path, b16_checkpoint):
    labels = tmp_path / 'labels.txt'
    labels.write_text('gradient\nnoise\n\npalette\n')
    images = [DATA / 'images' / 'gradient_rgb_300x200.png', DATA / 'images' / 'noise_gray_64x96.png']
    result = run_cli('classify', *images, '--labels-file', labels, '--labels', 'diagram', '--template',
                 'a photo of a {}.', '--top-k', '2', '--pretrained', b16_checkpoint, *B16)
    assert result.returncode == 0, result.stderr
    blocks = result.stdout.strip().split('\n\n')
    assert [b.splitlines()[0] for b in blocks] == [str(p) for p in images]
    assert all(len(b.splitlines()) == 3 and b.count('%') == 2 for b in blocks)
    as_json = json.loads(run_cli('classify', *images, '--labels', 'a', 'b', 'c', '--top-k', '2', '--json',
                             '--pretrained', b16_checkpoint, *B16).stdout)
    assert [len(x['labels']) for x in as_json] == [2, 2]


def test_embed_folder_keeps_rows_and_paths_aligned(tmp_path, b16_checkpoint, b16):
    folder = tmp_path / 'images'
    (folder / 'nested').mkdir(parents=True)
    for name in ('palette_120.png', 'gradient_rgb_300x200.png'):
        (folder / name).write_bytes((DATA / 'images' / name).read_bytes())
    (folder / 'nested' / 'noise.png').write_bytes((DATA / 'images' / 'noise_gray_64x96.png').read_bytes())
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\nnot really')
    (folder / 'notes.txt').write_text('not an image')
    extra = DATA / 'images' / 'clip_diagram_rgba.png'
    out = tmp_path / 'out' / 'features.npy'
    result = run_cli('embed', folder, extra, '--out', out, '--batch-size', '2', '--pretrained', b16_checkpoint, *B16,
                 '--progress-interval', '0')
    assert result.returncode == 0, result.stderr
    assert 'broken.png' in result.stderr and 'warning' in result.stderr
    progress = [line for line in result.stderr.splitlines() if line.startswith('progress: ')]
    assert progress and all(' images done, ' in line and line.endswith(' img/s') or 'left' in line for line in progress)
    assert '\r' not in result.stderr  # plain lines in a log file, not a terminal's bar
    paths = (tmp_path / 'out' / 'features.paths.txt').read_text().splitlines()
    # inputs in the order given, each folder in path order
    expected = sorted([folder / 'palette_120.png', folder / 'gradient_rgb_300x200.png',
                       folder / 'nested' / 'noise.png'], key=str) + [extra]
    assert paths == [str(p) for p in expected]
    features = np.load(out)
    assert features.dtype == np.float32 and features.shape == (4, 512)
    assert np.allclose(np.linalg.norm(features, axis=1), 1, atol=1e-5)
    assert np.allclose(features, _features(b16, paths).numpy(), atol=1e-5)
    assert sorted(p.name for p in out.parent.iterdir()) == ['.features.npy.lock', 'features.npy', 'features.paths.txt']


def test_embed_text_file(tmp_path, b16_checkpoint, b16):
    lines = tmp_path / 'captions.txt'
    lines.write_text('a diagram\n\na dog\na cat\n')
    out = tmp_path / 'text.npy'
    result = run_cli('embed', '--text-file', lines, '--out', out, '--pretrained', b16_checkpoint, *B16)
    assert result.returncode == 0, result.stderr
    model, _, tokenizer = b16
    with torch.no_grad():
        expected = model.encode_text(tokenizer(['a diagram', 'a dog', 'a cat']), normalize=True)
    assert np.allclose(np.load(out), expected.numpy(), atol=1e-5)
    assert (tmp_path / 'text.paths.txt').read_text().splitlines() == ['a diagram', 'a dog', 'a cat']


def test_offline_error_says_what_to_do(tmp_path):
    env = {'HF_HUB_OFFLINE': '1', 'HF_HUB_CACHE': str(tmp_path / 'empty-cache')}
    for args in (['classify'], ['embed', str(DATA / 'images'), '--out', str(tmp_path / 'x.npy')]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1
        assert 'eva_clip_psz14.pt' in result.stderr and '--pretrained /path/to/eva_clip_psz14.pt' in result.stderr
        assert 'Traceback' not in result.stderr
    assert not (tmp_path / 'x.npy').exists()


def test_bad_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / 'bad.pt'
    bad.write_bytes(b'garbage')
    result = run_cli('classify', '--pretrained', bad, *B16)
    assert result.returncode == 1 and str(bad) in result.stderr and 'Traceback' not in result.stderr
