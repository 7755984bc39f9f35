"""The tar reader and the unit planner as functions: milliseconds a case, no model, no command line."""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

import pytest

from eva_open_clip.embed.inputs import InputError, Source
from eva_open_clip.embed.samples import unit_samples
from eva_open_clip.embed.units import group_units, plan_units
from eva_open_clip.runtime.skips import Sample, Skip

MEMBERS = [('a.jpg', b'A'), ('a.txt', b'cap a'), ('a.json', b'{"n": 1}'), ('__index__', b'webdataset: no sample'),
           ('b.jpg', b'B'), ('b.json', b'[1]'), ('c.txt', b'no image'), ('d.png', b'D'), ('d.json', b'{"n": 4')]


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w', format=tarfile.GNU_FORMAT) as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _read(tmp_path: Path, data: bytes, name: str = 's.tar') -> list[Sample | Skip]:
    path = tmp_path / name
    path.write_bytes(data)
    return list(unit_samples(str(path), (), caption_key='txt'))


def test_samples_are_consecutive_members_of_one_key(tmp_path):
    assert _read(tmp_path, _tar(MEMBERS)) == [
        Sample('a', b'A', b'cap a', {'n': 1}),  # a member named __X__ belongs to no sample
        Skip('b', 'bad_json', 'not a JSON object'),
        Skip('c', 'no_image', 'no jpg/jpeg/png/webp member'),
        Skip('d', 'bad_json', "Expecting ',' delimiter: line 1 column 8 (char 7)"),
    ]


def test_a_gzipped_shard_reads_as_the_tar(tmp_path):
    assert _read(tmp_path, gzip.compress(_tar(MEMBERS)), 's.tar.gz') == _read(tmp_path, _tar(MEMBERS))


@pytest.mark.parametrize('cut,kept,damage', [
    # inside the data of b.jpg (after its 512-byte header): a is kept, b is lost, the damage names it
    (lambda data, start: start('b.jpg') + 512, ['a'],
     Skip('b', 'damaged_tar', 'the shard ends inside member b.jpg (ReadError)')),
    # inside the header of b.jpg, after its name: b's sample is known to be the one cut
    (lambda data, start: start('b.jpg') + 200, ['a'],
     Skip('b', 'damaged_tar', 'the shard ends inside the header of member b.jpg')),
    # at a member boundary, with no end marker: every whole sample is kept, and the cut is recorded
    (lambda data, start: start('d.png'), ['a', 'b', 'c'],
     Skip(None, 'damaged_tar', 'no end-of-archive marker after member c.txt (cut short?)')),
])
def test_damage_keeps_every_sample_before_it(tmp_path, cut, kept, damage):
    data = _tar(MEMBERS)
    with tarfile.open(fileobj=io.BytesIO(data)) as tf:
        offsets = {m.name: m.offset for m in tf.getmembers()}
    items = _read(tmp_path, data[:cut(data, offsets.__getitem__)])
    assert [i.key for i in items[:-1]] == kept and items[-1] == damage


def test_empty_and_garbage_shards(tmp_path):
    assert _read(tmp_path, _tar([])) == []  # an archive of end blocks only: no sample, no damage
    assert _read(tmp_path, b'') == [Skip(None, 'damaged_tar', 'not a readable tar (ReadError)')]
    [skip] = _read(tmp_path, b'not a tar at all' * 100)
    assert skip.key is None and skip.reason == 'damaged_tar'


def test_image_files_are_their_own_samples():
    assert list(unit_samples(None, ['x/1.png', 'x/2.jpg'])) == [Sample('x/1.png', 'x/1.png'),
                                                                Sample('x/2.jpg', 'x/2.jpg')]


def _sources(tmp_path: Path, names: list[str]) -> list[Source]:
    out = []
    for name in names:
        path = tmp_path / name
        if not path.exists():
            path.write_bytes(name.encode())
        stat = path.stat()
        out.append(Source(str(path), str(path), stat.st_size, stat.st_mtime_ns if name.endswith('.tar') else None))
    return out


def test_units_are_shards_alone_and_runs_of_image_files(tmp_path):
    sources = _sources(tmp_path, ['1.png', '2.png', '3.png', 'a.tar', '4.png', 'b.tar', 'c.tar'])
    units = group_units(sources, part_size=2, start=5)
    assert [(u.index, [Path(s.path).name for s in u.sources]) for u in units] == [
        (5, ['1.png', '2.png']), (6, ['3.png']), (7, ['a.tar']), (8, ['4.png']), (9, ['b.tar']), (10, ['c.tar'])]
    assert [u.shard is not None for u in units] == [False, False, True, False, True, True]


def test_the_plan_keeps_done_units_and_adds_new_sources_after_them(tmp_path):
    inputs = tmp_path / 'in'
    inputs.mkdir()
    out = tmp_path / 'out'
    out.mkdir()
    first = [str(p.path) for p in _sources(inputs, ['a.tar', 'b.tar'])]
    units, _, note = plan_units(out, first, None, 100, {})
    assert [u.index for u in units] == [0, 1] and note is None
    listing = (out / 'units.jsonl').read_text()
    assert [json.loads(line)['unit'] for line in listing.splitlines()] == [0, 1]
    done = {0: units[0]}
    more = first + [str(p.path) for p in _sources(inputs, ['0.tar'])]  # sorts first, comes last: numbered 2
    units, _, _ = plan_units(out, more, None, 100, done)
    assert [(u.index, Path(u.source).name) for u in units] == [(0, 'a.tar'), (1, 'b.tar'), (2, '0.tar')]
    (out / 'units.jsonl').write_text('{"unit": 0, "sour')  # damaged: rebuilt from the done records
    units, _, note = plan_units(out, more, None, 100, done)
    assert [u.index for u in units] == [0, 1, 2] and 'was damaged; rebuilt from the records of the 1 finished' in note
    os.utime(inputs / 'a.tar', ns=(1, 1))
    with pytest.raises(InputError, match=r'a\.tar: changed since it was listed .*mtime_ns'):
        plan_units(out, more, None, 100, done)
    with pytest.raises(InputError, match=r'a\.tar: embedded into .* before, but no longer among the inputs'):
        plan_units(out, more[1:], None, 100, done)
