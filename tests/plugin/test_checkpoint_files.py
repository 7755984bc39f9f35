"""Every checkpoint file that torch.load reads loads the same through open_clip, and a non-strict load says
what it skipped, as open_clip does for its own models.

The files are written here by the installed torch (CI runs this under the oldest and the newest supported
torch), in each zip layout torch's reader accepts, and compared value for value with torch.load.
"""
from __future__ import annotations

import io
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch

from eva_open_clip.checkpoint import CheckpointError, read_state_dict
from support.checkpoints import register_reference, released_state_dict


class _Unseekable(io.RawIOBase):
    """A write-only stream without seek: Python's zipfile then writes data descriptors after each record."""

    def __init__(self, file):
        self.file = file

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        return self.file.write(data)


def _repack(source: Path, target: Path, folder: str | None = None) -> Path:
    """`source`'s records rewritten by Python's zipfile: zip64 local headers, data descriptors, and the
    records' folder renamed to `folder` (e.g. the `archive/` of older torch files)."""
    with zipfile.ZipFile(source) as src, open(target, 'wb') as f:
        with zipfile.ZipFile(_Unseekable(f), 'w', zipfile.ZIP_STORED) as dst:
            for info in src.infolist():
                name = info.filename if folder is None else f"{folder}/{info.filename.split('/', 1)[1]}"
                with dst.open(name, 'w', force_zip64=True) as record:
                    record.write(src.read(info))
    return target


def _save(state_dict: dict, path: Path, layout: str) -> Path:
    if layout == 'crc off':
        if not hasattr(torch.serialization, 'set_crc32_options'):
            pytest.skip(f'torch {torch.__version__} has no torch.serialization.set_crc32_options')
        torch.serialization.set_crc32_options(False)
        try:
            torch.save(state_dict, path)
        finally:
            torch.serialization.set_crc32_options(True)
        with zipfile.ZipFile(path) as archive:
            assert {info.CRC for info in archive.infolist()} == {0}
        return path
    if layout == 'legacy pickle':
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
        return path
    torch.save(state_dict, path.with_suffix('.plain'))
    if layout == 'default':
        return path.with_suffix('.plain').rename(path)
    return _repack(path.with_suffix('.plain'), path, folder='archive' if layout == 'archive/ prefix' else None)


LAYOUTS = ['default', 'crc off', 'zip64 and data descriptors', 'archive/ prefix', 'legacy pickle']


@pytest.mark.parametrize('layout', LAYOUTS)
def test_every_layout_torch_reads_loads_the_same(layout, tmp_path):
    released = released_state_dict('tiny_a')
    path = _save(released, tmp_path / 'checkpoint.pt', layout)
    by_torch = torch.load(path, map_location='cpu', weights_only=True)
    ours = read_state_dict(path)
    assert list(ours) == list(by_torch) == list(released)
    for key, value in ours.items():
        assert value.dtype == by_torch[key].dtype and torch.equal(value, by_torch[key]), key
    reference = tmp_path / 'reference.pt'
    torch.save(released, reference)
    model = open_clip.create_model(register_reference('tiny_a'), pretrained=str(path))
    expected = open_clip.create_model(register_reference('tiny_a'), pretrained=str(reference)).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_a_checksum_mismatch_is_corruption_named_by_record(tmp_path):
    path = tmp_path / 'checkpoint.pt'
    torch.save(released_state_dict('tiny_a'), path)
    data = bytearray(path.read_bytes())
    at = data.index(b'ctorch\n')  # inside data.pkl: the pickle names torch's classes
    data[at + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as error:
        open_clip.create_model(register_reference('tiny_a'), pretrained=str(path))
    assert str(error.value) == (f'{path}: record checkpoint/data.pkl is corrupted '
                                '(its CRC-32 does not match its data)')


def _drop_one_and_add_one(state_dict: dict, key: str) -> dict:
    state_dict = dict(state_dict)
    del state_dict[key]
    state_dict['extra.weight'] = torch.zeros(2)
    return state_dict


def test_non_strict_load_reports_what_it_skipped_as_open_clip_does(tmp_path):
    # open_clip's own behaviour, on one of its models: model key names in both lists
    stock = open_clip.create_model('RN50')
    stock_key = 'visual.conv1.weight'
    torch.save(_drop_one_and_add_one(stock.state_dict(), stock_key), tmp_path / 'rn50.pt')
    stock_result = open_clip.load_checkpoint(stock, str(tmp_path / 'rn50.pt'), strict=False)
    assert (stock_result.missing_keys, stock_result.unexpected_keys) == ([stock_key], ['extra.weight'])
    # a released EVA file: the same, in the open_clip model's key names
    path = tmp_path / 'eva.pt'
    torch.save(_drop_one_and_add_one(released_state_dict('tiny_a'), 'visual.patch_embed.proj.bias'), path)
    model = open_clip.create_model(register_reference('tiny_a'))
    before = model.visual.trunk.patch_embed.proj.bias.detach().clone()
    result = open_clip.load_checkpoint(model, str(path), strict=False)
    assert type(result) is type(stock_result)
    assert (result.missing_keys, result.unexpected_keys) == (['visual.trunk.patch_embed.proj.bias'], ['extra.weight'])
    assert torch.equal(model.visual.trunk.patch_embed.proj.bias, before)  # left as it was, as load_state_dict does
    full = open_clip.create_model(register_reference('tiny_a'))
    torch.save(released_state_dict('tiny_a'), tmp_path / 'full.pt')
    assert open_clip.load_checkpoint(full, str(tmp_path / 'full.pt'), strict=False) == result.__class__([], [])
    for key, value in model.state_dict().items():  # everything else was loaded
        if key != 'visual.trunk.patch_embed.proj.bias':
            assert torch.equal(value, full.state_dict()[key]), key
    with pytest.raises(CheckpointError, match="1 missing key.*'visual.patch_embed.proj.bias'"):
        open_clip.load_checkpoint(open_clip.create_model(register_reference('tiny_a')), str(path))
