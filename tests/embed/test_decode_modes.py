"""`--decode exact` hands over uint8 pixels that the device turns into exactly open_clip's preprocessed input;
`--decode fast` decodes JPEGs at reduced scale and resizes in torch, within stated bounds of exact, and takes
every other format the exact way. Both read every image mode the same way (EXIF orientation ignored, as
open_clip's transform ignores it)."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from eva_open_clip.runtime.pixels import Pixels
from support.checkpoints import DATA

# how far `fast` may move a JPEG from `exact`: uint8 levels at the released models' 224 px, and the cosine of the
# tiny model's features at its 56 px (the strongest reduction); measured on these pictures, stated in docs/embed.md
MAX_LEVELS_FULL_SCALE, MAX_LEVELS_DRAFT, MEAN_LEVELS = 2, 12, 1.5
MIN_COSINE_TINY = 0.98  # typical 0.997: the draft's DCT scaling makes nearly all of it (without it: 0.99999)


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth picture (as photographs are, unlike noise): random colours, bilinearly enlarged."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR)


def _encoded(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def _jpegs() -> dict[str, bytes]:
    photo = _photo(500, 375)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees": ignored by open_clip's transform, and so by both modes
    return {
        'rgb 500x375': _encoded(photo, 'JPEG', quality=90),
        'rgb 256x256': _encoded(_photo(256, 256, 1), 'JPEG', quality=90),
        'rgb 1600x1200 (drafted)': _encoded(_photo(1600, 1200, 2), 'JPEG', quality=90),
        'rgb 3000x1000 (drafted)': _encoded(_photo(3000, 1000, 3), 'JPEG', quality=90),
        'grey': _encoded(photo.convert('L'), 'JPEG', quality=90),
        'cmyk': _encoded(photo.convert('CMYK'), 'JPEG', quality=90),
        'exif orientation': _encoded(photo, 'JPEG', quality=90, exif=exif.tobytes()),
    }


def _others() -> dict[str, bytes]:
    grey16 = Image.fromarray((np.arange(96 * 64, dtype=np.uint16).reshape(96, 64) * 10).astype(np.uint16))
    return {
        'png rgba': (DATA / 'images' / 'clip_diagram_rgba.png').read_bytes(),
        'png palette': (DATA / 'images' / 'palette_120.png').read_bytes(),
        'png grey': (DATA / 'images' / 'noise_gray_64x96.png').read_bytes(),
        'png 16-bit grey': _encoded(grey16, 'PNG'),
        'webp': _encoded(_photo(300, 200, 4), 'WEBP', quality=90),
    }


def _released_transform(size: int = 224):
    """The inference transform of the released models (224 px; 336 and 448 for two of them)."""
    import open_clip
    return open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                     std=open_clip.OPENAI_DATASET_STD, resize_mode='shortest', interpolation='bicubic')


@pytest.fixture(scope='module')
def modes():
    preprocess = _released_transform()
    return Pixels(preprocess, 'exact'), Pixels(preprocess, 'fast')


@pytest.mark.parametrize('name', list(_jpegs()) + list(_others()))
def test_exact_is_open_clips_preprocess_bit_for_bit(modes, name):
    from eva_open_clip.runtime.decode import open_image
    preprocess = _released_transform()
    data = {**_jpegs(), **_others()}[name]
    exact, _ = modes
    prepared = exact.prepare(data)
    assert prepared.dtype == torch.uint8  # a quarter of float32's bytes to hand over
    assert torch.equal(exact.to_model(prepared[None], torch.float32)[0], preprocess(open_image(data)))


@pytest.mark.parametrize('name', list(_jpegs()))
def test_fast_jpegs_are_within_the_stated_bounds(modes, name):
    exact, fast = modes
    data = _jpegs()[name]
    a, b = exact.prepare(data), fast.prepare(data)
    assert a.shape == b.shape
    levels = (a.int() - b.int()).abs()
    assert levels.max() <= (MAX_LEVELS_DRAFT if 'drafted' in name else MAX_LEVELS_FULL_SCALE)
    assert levels.float().mean() <= MEAN_LEVELS


@pytest.mark.parametrize('name', list(_jpegs()))
def test_fast_moves_the_features_of_a_model_little(tiny, name):
    _, model, preprocess, _ = tiny  # the tiny model's own small size: the largest reduction the draft makes
    exact, fast = Pixels(preprocess, 'exact'), Pixels(preprocess, 'fast')
    data = _jpegs()[name]
    with torch.no_grad():
        features = model.encode_image(exact.to_model(torch.stack([exact.prepare(data), fast.prepare(data)]),
                                                     torch.float32), normalize=True)
    assert float(features[0] @ features[1]) >= MIN_COSINE_TINY


@pytest.mark.parametrize('name', list(_others()))
def test_fast_takes_other_formats_the_exact_way(modes, name):
    exact, fast = modes
    data = _others()[name]
    assert torch.equal(fast.prepare(data), exact.prepare(data))


def test_exif_orientation_is_ignored_in_both_modes(modes):
    exact, fast = modes
    jpegs = _jpegs()
    for mode in modes:
        assert torch.equal(mode.prepare(jpegs['exif orientation']), mode.prepare(jpegs['rgb 500x375']))
    assert fast.prepare(jpegs['exif orientation']).shape == exact.prepare(jpegs['rgb 500x375']).shape


def test_a_transform_of_another_shape_runs_whole_in_the_workers():
    from torchvision import transforms as tv
    transform = tv.Compose([tv.Resize((32, 48)), tv.ToTensor()])  # no Normalize: not open_clip's shape
    pixels = Pixels(transform, 'fast')
    data = _jpegs()['rgb 500x375']
    prepared = pixels.prepare(data)
    assert not pixels.split and prepared.dtype == torch.float32
    assert torch.equal(pixels.to_model(prepared[None], torch.float32)[0], transform(Image.open(io.BytesIO(data))))
