"""The training data of the `train` tests."""
from __future__ import annotations

import pytest

from support.train import shards


@pytest.fixture(scope='session')
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp('train-data')
    return dict(train=shards(root / 'train', 6, 24), val=shards(root / 'val', 1, 16, offset=1000),
                bare=shards(root / 'bare', 2, 4, captions=False))
