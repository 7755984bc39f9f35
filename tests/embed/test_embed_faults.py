"""`embed --out DIR` never loses, duplicates or misaligns a row: grown inputs, changed inputs, cut shards, mixed
json fields, two jobs on one folder, a full disk, damaged and orphan parts.

Each case runs the command line on the tiny model and compares the final folder with an uninterrupted run on
the final inputs: every sample exactly once, with the same features and metadata, and no stray file.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from support.cli import error_line, main_here
from support.embed import add_member, api_features, no_strays, png, read_folder, run_embed, same_output, same_rows


def _images(folder: Path, numbers) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in numbers:
        (folder / f'img_{i:03d}.png').write_bytes(png(i, 1))
        paths.append(folder / f'img_{i:03d}.png')
    return paths


def _shard(path: Path, samples: list[tuple[str, dict | None]], seed: int = 0) -> Path:
    """A shard of samples (key, json fields or None), each with a PNG and a caption."""
    with tarfile.open(path, 'w') as tf:
        for i, (key, fields) in enumerate(samples):
            add_member(tf, f'{key}.png', png(i, seed))
            add_member(tf, f'{key}.txt', f'caption of {key}'.encode())
            if fields is not None:
                add_member(tf, f'{key}.json', json.dumps(fields).encode())
    return path


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _grow(kind: str, root: Path, step: int) -> list[str]:
    """The inputs of a job whose sources grow: step 0 makes the first ones, step 1 adds more (interleaved)."""
    numbers = range(0, 20, 2) if step == 0 else range(1, 20, 2)
    root.mkdir(exist_ok=True)
    if kind == 'folder':
        _images(root / 'images', numbers)
        return [str(root / 'images')]
    if kind == 'glob':
        for i in numbers[:3]:
            _shard(root / f'shard-{i:05d}.tar', [(f'{i:05d}{k:04d}', {'n': k}) for k in range(3)], seed=i)
        return [str(root / 'shard-*.tar')]
    paths = _images(root / 'listed', numbers)
    with open(root / 'list.txt', 'a') as f:
        f.write(''.join(f'{p}\n' for p in paths))
    return ['--files-from', str(root / 'list.txt')]


@pytest.mark.parametrize('kind', ['folder', 'glob', 'files_from'])
def test_grown_inputs_become_new_units_and_no_row_moves(kind, tiny, tmp_path):
    inputs = tmp_path / 'inputs'
    args = _grow(kind, inputs, 0)
    out = tmp_path / 'out'
    _ok(run_embed(tiny, *args, '--part-size', '4', out=out))
    first = read_folder(out)
    _grow(kind, inputs, 1)
    _ok(run_embed(tiny, *args, '--part-size', '4', out=out))
    reference = tmp_path / 'reference'
    _ok(run_embed(tiny, *args, '--part-size', '4', out=reference))
    rows = same_rows(out, reference)
    assert len(rows) == (20 if kind != 'glob' else 18)
    for key, row in first.items():  # the first run's rows stay where they were
        assert rows[key]['part'] == row['part'] and np.array_equal(rows[key]['image'], row['image'])
    no_strays(out)
    assert json.loads((out / 'summary.json').read_text())['rows'] == len(rows)


def test_changed_shard_is_refused_by_name(tiny, tmp_path):
    shard = _shard(tmp_path / 'a.tar', [(f'k{i}', None) for i in range(3)])
    out = tmp_path / 'out'
    _ok(run_embed(tiny, shard, out=out))
    before = read_folder(out)
    _shard(shard, [(f'k{i}', None) for i in range(4)])  # rewritten with one more sample, padded to the same size
    line = error_line(run_embed(tiny, shard, out=out), 2)
    assert line.startswith(f'eva-open-clip embed: {shard}: changed since it was listed for {out} (mtime_ns ')
    assert 'restore it, or embed into a new --out folder' in line
    assert sorted(read_folder(out)) == sorted(before)


def _member_ends(shard: Path) -> dict[str, int]:
    """The byte offset where each member's data ends, padding included."""
    with tarfile.open(shard) as tf:
        return {m.name: m.offset_data + -(-m.size // 512) * 512 for m in tf.getmembers()}


@pytest.mark.parametrize('where', ['after a sample', 'inside a member', 'inside a header'])
def test_shard_cut_short_keeps_every_whole_sample(where, tiny, tmp_path):
    whole = _shard(tmp_path / 'whole.tar', [(f'k{i}', {'i': i}) for i in range(5)])
    ends = _member_ends(whole)
    cut = {'after a sample': ends['k2.json'], 'inside a member': ends['k2.json'] + 600,
           'inside a header': ends['k2.json'] + 200}[where]
    shard = tmp_path / 'cut.tar'
    shard.write_bytes(whole.read_bytes()[:cut])
    out = tmp_path / 'out'
    _ok(run_embed(tiny, shard, '--captions', out=out))
    rows = read_folder(out)
    assert list(rows) == ['k0', 'k1', 'k2']  # k3's first member is cut (or missing): k0-k2 are whole
    image, text = api_features(tiny, [_png_image(i) for i in range(3)],
                               [f'caption of k{i}' for i in range(3)])
    assert np.allclose(np.stack([rows[k]['image'] for k in rows]), image, atol=1e-5)
    assert np.allclose(np.stack([rows[k]['text'] for k in rows]), text, atol=1e-5)
    record = json.loads((out / 'shards' / '000000.json').read_text())
    assert len(record['skipped']) == 1  # one damage, one record
    damage = record['skipped'][0]
    assert damage['reason'] == 'damaged_tar'
    if where == 'after a sample':
        assert damage['key'] is None and 'after member k2.json' in damage['detail']
    else:
        assert damage['key'] == 'k3' and 'member k3.png' in damage['detail']


def _png_image(i: int) -> Image.Image:
    return Image.open(io.BytesIO(png(i, 0)))


def test_metadata_keeps_every_field_with_one_type_per_column(tiny, tmp_path):
    samples = [('a0', None),  # the first sample has no json
               ('a1', {'uid': 1, 'url': 'http://x/1', 'mixed': 7, 'exif': {'iso': 100}}),
               ('a2', {'uid': 2, 'url': 'http://x/2', 'ratio': 1}),
               ('a3', {'uid': 3, 'ratio': 1.5, 'mixed': 'seven'}),  # 'mixed': a number in part 0, text in part 1
               ('a4', {'uid': 4, 'late': True}),  # a field only in the last part
               ('a5', {'uid': 5, 'big': 2 ** 70})]
    shard = _shard(tmp_path / 's.tar', samples)
    out = tmp_path / 'out'
    _ok(run_embed(tiny, shard, '--part-size', '3', out=out))
    assert len(list((out / 'metadata').iterdir())) == 2
    table = ds.dataset(out / 'metadata').to_table()
    assert table.column_names == ['image_path', 'big', 'exif', 'late', 'mixed', 'ratio', 'uid', 'url']
    rows = {r['image_path']: r for r in table.to_pylist()}
    assert rows['a0'] == dict(image_path='a0', big=None, exif=None, late=None, mixed=None, ratio=None, uid=None,
                              url=None)
    assert rows['a1']['uid'] == 1 and rows['a1']['url'] == 'http://x/1'
    assert json.loads(rows['a1']['exif']) == {'iso': 100}
    assert [rows[k]['ratio'] for k in ('a2', 'a3')] == [1.0, 1.5]  # ints and floats: one float column
    assert [json.loads(rows[k]['mixed']) for k in ('a1', 'a3')] == [7, 'seven']  # differing types: JSON text
    assert rows['a4']['late'] is True and json.loads(rows['a5']['big']) == 2 ** 70
    parts = [pq.read_table(p) for p in sorted((out / 'metadata').iterdir())]
    assert all(p.column_names == table.column_names for p in parts)
    assert pa.concat_tables(parts).column('uid').to_pylist() == [None, 1, 2, 3, 4, 5]  # one schema: parts concatenate
    schemas = {str(pq.read_schema(p)) for p in (out / 'metadata').iterdir()}
    assert len(schemas) == 1
    no_strays(out)


def _shards_for_a_while(root: Path, count: int = 3, per: int = 40) -> str:
    for s in range(count):
        _shard(root / f'w-{s}.tar', [(f'{s}{i:04d}', {'i': i}) for i in range(per)], seed=s)
    return str(root / f'w-{{0..{count - 1}}}.tar')


def test_two_jobs_on_one_folder(tiny, tmp_path):
    pattern = _shards_for_a_while(tmp_path)
    args = (pattern, '--batch-size', '1', '--part-size', '7', '--workers', '1')
    reference = tmp_path / 'reference'
    _ok(run_embed(tiny, *args, out=reference))
    out = tmp_path / 'out'
    jobs = [run_embed(tiny, *args, out=out, background=True) for _ in range(2)]
    results = [(job.wait(timeout=600), job.stderr.read()) for job in jobs]
    for job in jobs:
        job.stdout.close()
        job.stderr.close()
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert 'Traceback' not in refused
    line = refused.strip().splitlines()[-1]
    winner = next(job for job, (code, _) in zip(jobs, results) if code == 0)
    assert line == (f'eva-open-clip embed: {out} is in use by another embed job (host {os.uname().nodename} pid '
                    f'{winner.pid}); wait for it to end or stop it, then run the same command to resume')
    same_output(reference, out)
    no_strays(out)


@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of 160 KiB (each small file takes a 4 KiB page), grown by `grow()`; skipped where mounting is not
    allowed."""
    mount = tmp_path / 'disk'
    mount.mkdir()
    if subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=160k', 'tmpfs', str(mount)], capture_output=True).returncode:
        pytest.skip('mounting a tmpfs needs root')
    yield mount, lambda: subprocess.run(['mount', '-o', 'remount,size=64m', str(mount)], check=True)
    subprocess.run(['umount', str(mount)], check=True)


def test_disk_full_stops_in_one_line_and_resumes_exactly(tiny, tmp_path, small_disk):
    pattern = _shards_for_a_while(tmp_path, count=3, per=30)
    args = (pattern, '--captions', '--part-size', '3', '--workers', '1')
    reference = tmp_path / 'reference'
    _ok(run_embed(tiny, *args, out=reference))
    assert sum(1 for p in reference.rglob('*') if p.is_file()) * 4096 > 2 * 160 * 1024  # it cannot fit
    mount, grow = small_disk
    out = mount / 'out'
    line = error_line(run_embed(tiny, *args, out=out), 1)
    assert line.startswith(f'eva-open-clip embed: cannot write {out}/') and line.endswith(
        ': free some space and run the same command to resume') and ': the disk is full (' in line, line
    for path in out.rglob('*'):  # every file under a final name is whole
        if path.suffix == '.npy':
            np.load(path)
        elif path.suffix == '.parquet':
            pq.read_table(path)
        elif path.suffix == '.json':
            json.loads(path.read_text())
        elif path.suffix == '.jsonl':
            [json.loads(line) for line in path.read_text().splitlines()]
    grow()
    _ok(run_embed(tiny, *args, out=out))
    same_output(reference, out)
    no_strays(out)


def test_damaged_and_orphan_parts_are_redone(tiny, tmp_path):
    pattern = _shards_for_a_while(tmp_path, count=3, per=10)
    args = (pattern, '--captions', '--part-size', '4', '--workers', '1')
    reference = tmp_path / 'reference'
    _ok(run_embed(tiny, *args, out=reference))
    out = tmp_path / 'out'
    shutil.copytree(reference, out)
    (out / 'img_emb' / 'img_emb_000000001.npy').unlink()  # a part deleted after its unit was done
    meta = out / 'metadata' / 'metadata_000001002.parquet'
    meta.write_bytes(meta.read_bytes()[:-20])  # a part truncated after its unit was done
    text = out / 'text_emb' / 'text_emb_000002000.npy'
    np.save(text, np.zeros((3, np.load(text).shape[1]), np.float32))  # a part with another row count
    shutil.copy(out / 'img_emb' / 'img_emb_000000000.npy', out / 'img_emb' / 'img_emb_000000003.npy')  # orphans
    (out / 'metadata' / '.metadata_000000000.parquet.x1y2z3w4.tmp').write_bytes(b'half')
    result = _ok(run_embed(tiny, *args, out=out))
    assert 'this run: 30 samples' in result.stderr  # all three units were redone
    same_output(reference, out)
    no_strays(out)


def test_input_errors_are_one_line_before_the_model_loads(tiny, tmp_path):
    (tmp_path / 'damaged.pt').write_bytes(b'not a checkpoint')  # would fail only once the model is loaded
    no_model = ('--pretrained', str(tmp_path / 'damaged.pt'))
    cases = {
        (str(tmp_path / 'missing.tar'),): f'{tmp_path / "missing.tar"}: no such file or folder',
        ('--files-from', str(tmp_path / 'no-list.txt')):
            f'--files-from {tmp_path / "no-list.txt"}: No such file or directory',
        (str(tmp_path / 's-{0..1}.tar'),): f'{tmp_path / "s-0.tar"}: no such file (from {tmp_path / "s-{0..1}.tar"})',
    }
    (tmp_path / 'list.txt').write_text(f'{tmp_path / "gone.png"}\n')
    cases[('--files-from', str(tmp_path / 'list.txt'))] = \
        f'{tmp_path / "gone.png"}: no such file (line 1 of --files-from {tmp_path / "list.txt"})'
    for args, message in cases.items():
        result = main_here('embed', *args, '--out', tmp_path / 'out', *no_model)
        assert error_line(result, 2) == f'eva-open-clip embed: {message}'
    for flag in ('--part-size', '--batch-size'):
        result = main_here('embed', tmp_path, '--out', tmp_path / 'o', flag, '0')
        assert error_line(result, 2) == f'eva-open-clip embed: {flag} must be at least 1'
    assert not (tmp_path / 'o').exists()


def test_gzipped_shards_are_read_as_tars(tiny, tmp_path):
    plain = _shard(tmp_path / 'plain.tar', [(f'g{i}', {'i': i}) for i in range(4)])
    reference = tmp_path / 'reference'
    _ok(run_embed(tiny, plain, out=reference))
    for name in ('gz.tar.gz', 'gz.tgz'):
        (tmp_path / name).write_bytes(gzip.compress(plain.read_bytes()))
        _ok(run_embed(tiny, tmp_path / name, out=tmp_path / name.replace('.', '-')))
        same_rows(tmp_path / name.replace('.', '-'), reference)
    data = gzip.compress(plain.read_bytes())
    (tmp_path / 'cut.tgz').write_bytes(data[:len(data) // 2])
    out = tmp_path / 'cut'
    _ok(run_embed(tiny, tmp_path / 'cut.tgz', out=out))
    rows = read_folder(out)
    assert 0 < len(rows) < 4 and list(rows) == [f'g{i}' for i in range(len(rows))]
    damage = json.loads((out / 'shards' / '000000.json').read_text())['skipped']
    assert len(damage) == 1 and damage[0]['reason'] == 'damaged_tar'


def test_a_full_disk_is_named_whichever_layer_notices(tmp_path, small_disk):
    """numpy and pyarrow report a short write without an errno; the message says the disk is full all the same."""
    import pyarrow as pa

    from eva_open_clip.durable import WriteError, write_atomic
    from eva_open_clip.embed.store.folder import _save_npy
    mount, _ = small_disk
    writers = {'rows.npy': _save_npy(np.ones((400, 256), np.float32)),
               'rows.parquet': lambda p: pq.write_table(pa.table({'x': np.arange(100_000)}), p)}
    for name, write in writers.items():
        with pytest.raises(WriteError) as error:
            write_atomic(mount / name, write)
        assert str(error.value).startswith(f'cannot write {mount / name}: the disk is full (')
        assert str(error.value).endswith(': free some space and run the same command to resume')
        assert list(mount.iterdir()) == []
