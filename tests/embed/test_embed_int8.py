"""`--quantize int8` through `embed` and `classify`: the rows of the int8 model, recorded in the folder's settings and
followed on resume; another quantization is refused like another precision."""
from __future__ import annotations

import json
import tarfile

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from support.checkpoints import DATA, needs_int8, register_reference
from support.cli import error_line, main_here
from support.embed import add_member, embed_here, png, read_folder

pytestmark = needs_int8()


@pytest.fixture(scope='module')
def shard(tmp_path_factory):
    folder = tmp_path_factory.mktemp('int8-shard')
    for n in range(2):
        with tarfile.open(folder / f's{n}.tar', 'w') as tf:
            for i in range(8):
                add_member(tf, f'{n}k{i}.png', png(i, 7 + n))
                add_member(tf, f'{n}k{i}.txt', f'caption {i}'.encode())
    return folder / 's0.tar'


def test_embed_in_int8_is_recorded_and_followed(tiny, shard, tmp_path):
    plain, int8 = tmp_path / 'plain', tmp_path / 'int8'
    assert embed_here(tiny, shard, '--captions', '--workers', '0', out=plain).returncode == 0
    result = embed_here(tiny, shard, '--captions', '--workers', '0', '--quantize', 'int8', out=int8)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'quantize int8' in result.stderr.splitlines()[0]
    assert json.loads((int8 / 'embed.json').read_text())['quantize'] == 'int8'
    a, b = read_folder(plain), read_folder(int8)
    assert sorted(a) == sorted(b)
    assert min(float(a[k]['image'] @ b[k]['image']) for k in a) >= 0.9995
    assert min(float(a[k]['text'] @ b[k]['text']) for k in a) >= 0.9995
    line = error_line(embed_here(tiny, shard, '--captions', '--quantize', 'none', out=int8), 2)
    assert "(quantize: 'int8' there, 'none' now)" in line
    grown = embed_here(tiny, shard, shard.with_name('s1.tar'), '--captions', '--workers', '0', out=int8)
    assert grown.returncode == 0 and f'quantize int8 (as {int8} was made)' in grown.stderr  # not said: the folder's


def test_classify_in_int8_gives_the_int8_models_probabilities(tiny):
    folder = tiny[0]
    image = DATA / 'images' / 'gradient_rgb_300x200.png'
    labels = ['a gradient', 'a cat', 'noise']
    result = main_here('classify', image, '--labels', *labels, '--quantize', 'int8', '--json', '--register',
                       f'test-tiny_a={folder / "tiny.json"}', '--model', 'test-tiny_a', '--pretrained',
                       folder / 'tiny.pt', '--device', 'cpu')
    assert result.returncode == 0, result.stderr
    got = {x['label']: x['prob'] for x in json.loads(result.stdout)[0]['labels']}
    model, _, preprocess = open_clip.create_model_and_transforms(
        register_reference('tiny_a'), pretrained=str(folder / 'tiny.pt'), quantize='int8')
    tokenizer = open_clip.get_tokenizer(register_reference('tiny_a'))
    with torch.no_grad():
        model.eval()
        image_features = model.encode_image(preprocess(Image.open(image))[None], normalize=True)
        text_features = model.encode_text(tokenizer(labels), normalize=True)
        probs = (model.logit_scale.exp() * image_features @ text_features.T).softmax(-1)[0]
    assert np.allclose([got[label] for label in labels], probs.numpy(), atol=1e-6)
