"""An interrupted `embed` run leaves no output and no scratch files, and an older output intact."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from eva_open_clip.embed.npy_job import embed_to_npy
from eva_open_clip.runtime.encoder import Encoder
from support.checkpoints import DATA


class _Interrupting(torch.nn.Module):
    """Stands in for the model: encodes one batch, then is interrupted."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    @staticmethod
    def preprocess(image):
        return torch.zeros(3, 8, 8)

    def encode_image(self, pixels, normalize=False):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        return torch.nn.functional.normalize(torch.ones(len(pixels), 4), dim=-1)


def _encoder(model: torch.nn.Module) -> Encoder:
    return Encoder(model, model.preprocess, None, 'cpu', 'fp32')


def test_interrupted_embed_leaves_previous_output(tmp_path):
    out = tmp_path / 'features.npy'
    np.save(out, np.zeros((1, 4), dtype=np.float32))
    (tmp_path / 'features.paths.txt').write_text('old\n')
    with pytest.raises(KeyboardInterrupt):
        embed_to_npy(lambda: _encoder(_Interrupting()), [str(DATA / 'images')], out, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.features.npy.lock', 'features.npy', 'features.paths.txt']
    assert np.load(out).shape == (1, 4)
    assert (tmp_path / 'features.paths.txt').read_text() == 'old\n'


def test_scratch_of_a_killed_run_is_removed_and_rows_written_once(tmp_path):
    out = tmp_path / 'features.npy'
    for stale in ('.features.npy.k1ll3d00.tmp', '.features.paths.txt.k1ll3d00.tmp'):
        (tmp_path / stale).write_bytes(b'left by a killed run')
    (tmp_path / '.other.npy.x.tmp').write_bytes(b'another output: left alone')
    rows, skipped = embed_to_npy(lambda: _encoder(_Encoding()), [str(DATA / 'images')], out, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.features.npy.lock', '.other.npy.x.tmp', 'features.npy',
                                                           'features.paths.txt']
    paths = (tmp_path / 'features.paths.txt').read_text().splitlines()
    assert rows == len(paths) == len(list((DATA / 'images').iterdir())) and not skipped
    array = np.load(out)
    assert array.dtype == np.float32 and array.shape == (rows, 4)
    expected = np.stack([_Encoding.features(Image.open(p).size[0]) for p in paths])
    assert np.allclose(array, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-6, atol=0)


class _Encoding(_Interrupting):
    """Encodes every batch: each image's features from its width, so that every row can be checked (the encoder
    normalizes them)."""

    @staticmethod
    def features(n: int) -> np.ndarray:
        return np.array([n, 1, 2, 3], dtype=np.float32)

    @staticmethod
    def preprocess(image):
        return torch.full((3, 8, 8), float(image.size[0]))

    def encode_image(self, pixels, normalize=False):
        return torch.stack([torch.tensor(self.features(int(p[0, 0, 0]))) for p in pixels])
