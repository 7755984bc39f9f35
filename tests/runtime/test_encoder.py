"""The encoder, right whatever the model's precision and whatever the caller does next: features unit-norm in
float32 (bf16 weights normalized in bf16 leave rows ~3e-3 off), the file's `logit_scale` in float32 (bf16 makes
100 a 98.86), the process's TF32 flags as the caller left them, the memory of a batch that ran out of memory freed
with the error, and rows that own their memory once handed to a writer."""
from __future__ import annotations

import gc
import weakref

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from eva_open_clip.classify import BUNDLED_IMAGE, classify
from eva_open_clip.errors import ToolError
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.encoder import Encoder, load_encoder, tf32_matmuls
from eva_open_clip.runtime.loading import load_model
from support.checkpoints import register_reference
from support.embed import TINY, embed_here


def test_bf16_features_are_unit_norm(tiny, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    for i in range(6):
        Image.new('RGB', (40 + i, 30), (i * 40, 90, 200 - i * 30)).save(folder / f'{i}.png')
    out = tmp_path / 'bf16.npy'
    assert embed_here(tiny, folder, '--precision', 'bf16', '--workers', '0', out=out).returncode == 0
    norms = np.linalg.norm(np.load(out).astype(np.float64), axis=1)
    assert np.abs(norms - 1).max() < 1e-6, norms  # normalized in float32: within its rounding
    lines = tmp_path / 'lines.txt'
    lines.write_text('a diagram\na dog\na cat\n')
    assert embed_here(tiny, '--text-file', lines, '--precision', 'pure_bf16', out=tmp_path / 't.npy').returncode == 0
    assert np.abs(np.linalg.norm(np.load(tmp_path / 't.npy').astype(np.float64), axis=1) - 1).max() < 1e-6


def test_the_tools_scale_by_the_files_logit_scale_whatever_the_precision(tiny):
    name = register_reference('tiny_a')
    checkpoint = str(tiny[0] / 'tiny.pt')
    released = torch.load(checkpoint, weights_only=True)['text.logit_scale'].float()
    for precision in ('bf16', 'pure_bf16', 'fp16', 'pure_fp16', 'fp32'):
        model, _, _ = load_model(ModelChoice.checked(name, checkpoint, 'cpu', precision), 'cpu', precision)
        assert model.logit_scale.dtype == torch.float32 and torch.equal(model.logit_scale.detach(), released)
    plain = open_clip.create_model(name, pretrained=checkpoint, precision='bf16')
    assert plain.logit_scale.dtype == torch.bfloat16  # open_clip's own call keeps open_clip's dtypes
    # classify's scale in bf16 is the file's (100.03 here), not bf16's 99
    encoder = load_encoder(ModelChoice.checked(name, checkpoint, 'cpu', 'bf16').resolved())
    assert encoder.logit_scale() == released.exp().item()
    assert classify(model=TINY, pretrained=checkpoint, precision='bf16')[0]['labels'][0]['label'] == \
        classify(model=TINY, pretrained=checkpoint, precision='fp32')[0]['labels'][0]['label']


def test_tf32_is_on_inside_the_block_only():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with pytest.raises(RuntimeError):
        with tf32_matmuls():
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
            raise RuntimeError('a failing batch')
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == before


class _RunsOutOfMemory(torch.nn.Module):
    """A model whose forward holds a large activation when the device runs out of memory."""

    def __init__(self):
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros(()))
        self.activation = None

    def encode_image(self, x):
        activation = torch.ones(1 << 20)
        self.activation = weakref.ref(activation)
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')


def test_an_out_of_memory_error_lets_go_of_the_batch_memory(tiny):
    _, model, preprocess, tokenizer = tiny
    stand_in = _RunsOutOfMemory()
    encoder = Encoder(stand_in, preprocess, tokenizer, 'cpu', 'fp32')
    with pytest.raises(ToolError) as error:
        encoder.encode_pixels(torch.stack([preprocess(Image.open(BUNDLED_IMAGE))]))
    assert str(error.value).startswith('cpu ran out of memory on a batch of 1: give a smaller batch_size')
    kept = error.value  # as a notebook keeps the last error
    gc.collect()
    assert stand_in.activation() is None  # no frame of the failed forward is kept alive through the error
    assert kept.__context__ is None and kept.__cause__ is None


def test_normalizing_with_the_device_constants_is_open_clips_input_bit_for_bit(tiny):
    _, model, preprocess, tokenizer = tiny
    encoder = Encoder(model, preprocess, tokenizer, 'cpu', 'fp32')
    image = Image.open(BUNDLED_IMAGE)
    pixels = encoder.pixels.prepare(BUNDLED_IMAGE).unsqueeze(0)
    assert pixels.dtype == torch.uint8
    made_once = encoder.pixels.to_model(pixels, torch.float32, encoder.pixels.normalization('cpu'))
    assert torch.equal(made_once, preprocess(image).unsqueeze(0))
    assert torch.equal(encoder.encode_pixels(pixels), model.encode_image(preprocess(image).unsqueeze(0),
                                                                         normalize=True).detach())
