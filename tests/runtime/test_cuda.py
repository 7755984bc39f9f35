"""What only a GPU can show (marker `gpu`; skipped without CUDA, run first by `benchmarks/gpu.py`): a launch after
warm-up makes no synchronizing call (mean and std made once on the device, pinned copies both ways); features
encoded on cuda:1 while cuda:0 is current equal cuda:0's (the copy-back's event is recorded on the encoder's own
stream); page-locked buffers are reused, not grown; TF32 for fp32 inside the encoder's calls only; `embed` with
the GPU's defaults gives unit-norm rows within bf16's reach of open_clip's."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eva_open_clip.runtime.encoder import Encoder
from support.embed import api_features, embed_here

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA GPU')]


def _encoder(tiny, device: str, precision: str = 'bf16') -> Encoder:
    _, model, preprocess, tokenizer = tiny
    import copy
    lowered = copy.deepcopy(model).to(device, torch.bfloat16 if precision == 'bf16' else torch.float32)
    return Encoder(lowered, preprocess, tokenizer, device, precision)


def _uint8(tiny, count: int) -> torch.Tensor:
    encoder = _encoder(tiny, 'cpu', 'fp32')
    images = [Image.new('RGB', (64 + i, 48), (i * 9 % 256, 80, 200)) for i in range(count)]
    return torch.stack([encoder.pixels.prepare(_png(image)) for image in images])


def _png(image: Image.Image) -> bytes:
    import io
    buffer = io.BytesIO()
    image.save(buffer, 'PNG')
    return buffer.getvalue()


def test_a_launch_after_warm_up_makes_no_synchronizing_call(tiny):
    encoder = _encoder(tiny, 'cuda:0')
    pixels = _uint8(tiny, 8).pin_memory()
    tokens = encoder.tokenizer(['a diagram'] * 8).pin_memory()
    encoder.launch_pixels(pixels).result()  # warm-up: kernels chosen, buffers made
    encoder.launch_tokens(tokens).result()
    torch.cuda.set_sync_debug_mode('error')
    try:
        image, text = encoder.launch_pixels(pixels), encoder.launch_tokens(tokens)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert image.result().shape[0] == text.result().shape[0] == 8


def test_features_on_another_gpu_than_the_current_one_are_complete(tiny):
    if torch.cuda.device_count() < 2:
        pytest.skip('needs two GPUs')
    pixels = _uint8(tiny, 64).pin_memory()
    first = _encoder(tiny, 'cuda:0').encode_pixels(pixels)
    torch.cuda.set_device(0)
    second = _encoder(tiny, 'cuda:1').encode_pixels(pixels)
    assert torch.equal(first, second)


def test_pinned_buffers_are_reused(tiny):
    encoder = _encoder(tiny, 'cuda:0')
    pixels = _uint8(tiny, 8).pin_memory()
    batches = [type('B', (), dict(pixels=pixels, tokens=None))() for _ in range(50)]
    for _ in encoder.encoded(batches):
        pass
    assert encoder._ring.made <= 2  # one in flight while the one before is collected


def test_tf32_only_inside_the_encoders_calls(tiny):
    torch.backends.cuda.matmul.allow_tf32 = False
    encoder = _encoder(tiny, 'cuda:0', 'fp32')
    encoder.encode_pixels(_uint8(tiny, 4))
    assert torch.backends.cuda.matmul.allow_tf32 is False


def test_embed_with_the_gpu_defaults_gives_open_clips_rows_within_bf16(tiny, tmp_path):
    folder = tmp_path / 'images'
    folder.mkdir()
    images = [Image.new('RGB', (60 + i, 50), (i * 30 % 256, 100, 50)) for i in range(12)]
    for i, image in enumerate(images):
        image.save(folder / f'{i:02d}.png')
    out = tmp_path / 'gpu.npy'
    assert embed_here(tiny, folder, out=out).returncode == 0  # bf16, batch 256, fast decoding (PNGs: exact)
    rows = np.load(out)
    assert np.abs(np.linalg.norm(rows.astype(np.float64), axis=1) - 1).max() < 1e-6
    reference, _ = api_features(tiny, images)
    assert np.min(np.sum(rows * reference, axis=1)) > 0.99
