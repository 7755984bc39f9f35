"""Checkpoints are read through a read-only mapping: any size, read-only files, the file never written."""
from __future__ import annotations

import hashlib
import os
import stat

import open_clip
import pytest
import torch
from safetensors.torch import save_file

from eva_open_clip import mapped_checkpoint
from eva_open_clip.checkpoint import read_state_dict
from support.checkpoints import golden, register_reference, rel_err, released_state_dict


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _mappings_of(path) -> list[str]:
    """Permissions of this process's mappings of `path` (from /proc/self/maps), e.g. 'r--s'."""
    with open('/proc/self/maps') as maps:
        return [line.split()[1] for line in maps if line.rstrip().endswith(str(path))]


@pytest.mark.parametrize('suffix', ['.pt', '.safetensors'])
def test_mapping_is_read_only_and_tensors_are_the_files(tmp_path, suffix):
    sd = {k: v.float() if 'head' in k else v for k, v in released_state_dict('rms_tiny_a').items()}  # mixed dtypes
    path = tmp_path / f'ckpt{suffix}'
    torch.save(sd, path) if suffix == '.pt' else save_file(sd, str(path))
    loaded = read_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    for key, value in sd.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
    perms = _mappings_of(path)
    assert perms and all(p.startswith('r-') for p in perms), perms  # never writable, never private-writable


def test_read_only_file_loads_and_is_never_written(tmp_path):
    path = tmp_path / 'rmspost.pt'
    torch.save(released_state_dict('rmspost_tiny_a'), path)
    os.chmod(path, stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    before, mtime = _digest(path), path.stat().st_mtime_ns
    low = open_clip.create_model(register_reference('rmspost_tiny_a'), pretrained=str(path), precision='pure_bf16')
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    model = open_clip.create_model(register_reference('rmspost_tiny_a'), pretrained=str(path))
    g = golden('rmspost_tiny_a')
    with torch.no_grad():
        assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-4
    assert _digest(path) == before and path.stat().st_mtime_ns == mtime


def test_shared_storages_and_views_are_read_as_torch_load_reads_them(tmp_path):
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    sd = {'a': base, 'b': base[1:3, 2:], 'c': base.t(), 'd': torch.tensor(3.5, dtype=torch.bfloat16)}
    path = tmp_path / 'views.pt'
    torch.save(sd, path)
    ours, theirs = mapped_checkpoint.read_torch_zip(path), torch.load(path, weights_only=True)
    for key in sd:
        assert ours[key].dtype == theirs[key].dtype and torch.equal(ours[key], theirs[key]), key
    assert ours['a'].untyped_storage().data_ptr() == ours['b'].untyped_storage().data_ptr()  # one storage, as saved
