"""`eva_open_clip.embed.embed`: the embedding tool as one Python call, with the command's guarantees and errors in a
Python caller's terms."""
from __future__ import annotations

import signal
import tarfile

import pytest

from eva_open_clip.embed import embed
from eva_open_clip.errors import COMMAND_LINE, ToolError, UsageError
from support.checkpoints import register_reference
from support.embed import TINY, add_member, embed_here, png, same_output


def _shard(path, count: int):
    with tarfile.open(path, 'w') as tf:
        for i in range(count):
            add_member(tf, f'k{i:03d}.png', png(i, 4))
            add_member(tf, f'k{i:03d}.txt', f'caption {i}'.encode())
    return path


def test_a_call_writes_what_the_command_writes(tiny, tmp_path):
    shards = [_shard(tmp_path / f's{n}.tar', 5 + n) for n in range(2)]
    assert embed_here(tiny, *shards, '--captions', '--part-size', '4', '--workers', '1',
                      out=tmp_path / 'command').returncode == 0
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    register_reference('tiny_a')
    result = embed(shards, out=tmp_path / 'call', model=TINY, pretrained=str(tiny[0] / 'tiny.pt'), captions=True,
                   part_size=4, workers=1, quiet=True)
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # a notebook's Ctrl-C is its own again
    same_output(tmp_path / 'command', tmp_path / 'call')
    assert (result.rows, result.skipped_by_reason, result.summary.units) == (11, {}, 2)


def test_errors_name_the_parameters_as_a_python_caller_spells_them(tiny, tmp_path):
    register_reference('tiny_a')
    with pytest.raises(UsageError) as error:
        embed([str(tmp_path)], out=tmp_path / 'x.npy', model=TINY, batch_size=0)
    assert str(error.value) == 'batch_size must be at least 1'
    assert error.value.spelled(COMMAND_LINE) == '--batch-size must be at least 1'
    with pytest.raises(UsageError, match=r"^text_file writes one FILE.npy: give out=FILE.npy$"):
        embed(out=tmp_path / 'folder', model=TINY, text_file=str(tmp_path / 'lines.txt'))
    with pytest.raises(UsageError, match=r"^model=nope: no such model .*eva_open_clip.list_eva_models\(\)"):
        embed([str(tmp_path)], out=tmp_path / 'folder', model='nope')
    (tmp_path / 'bad.tar').write_bytes(b'')
    with pytest.raises(ToolError, match='no sample could be embedded'):
        embed([str(tmp_path / 'bad.tar')], out=tmp_path / 'folder', model=TINY, pretrained=str(tiny[0] / 'tiny.pt'),
              workers=0, quiet=True)
