"""An interrupted `embed` run leaves no output and no scratch files, and an older output intact."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from eva_open_clip.npy_output import embed_to_npy
from conftest import DATA


class _Interrupting:
    """Stands in for the model-backed encoder: encodes one batch, then is interrupted."""

    device_type = 'cpu'

    def __init__(self):
        self.calls = 0

    @staticmethod
    def preprocess(image):
        return torch.zeros(3, 8, 8)

    def encode_pixels(self, pixels):
        self.calls += 1
        if self.calls > 1:
            raise KeyboardInterrupt
        return torch.nn.functional.normalize(torch.ones(len(pixels), 4), dim=-1)


def test_interrupted_embed_leaves_previous_output(tmp_path):
    out = tmp_path / 'features.npy'
    np.save(out, np.zeros((1, 4), dtype=np.float32))
    (tmp_path / 'features.paths.txt').write_text('old\n')
    with pytest.raises(KeyboardInterrupt):
        embed_to_npy(_Interrupting(), [str(DATA / 'images')], out, batch_size=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['features.npy', 'features.paths.txt']
    assert np.load(out).shape == (1, 4)
    assert (tmp_path / 'features.paths.txt').read_text() == 'old\n'
