"""`embed` takes what real collections hold and what people type: bad samples are rows or recorded skips,
the user's files are never touched, overlapping inputs are embedded once, huge images cost no memory,
damaged bookkeeping is rebuilt, and input problems name the input.

Each case runs the command line on the tiny model and compares the result with the Python API's features
or with an uninterrupted run over the same final inputs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eva_open_clip.embed.store.names import name_text, original_name
from eva_open_clip.embed.store.paths import part_name, sortable_number
from support.cli import COMMANDS, error_line
from support.embed import (
    TINY,
    add_member,
    api_features,
    embed_here,
    no_strays,
    png,
    read_folder,
    run_embed,
    same_output,
    same_rows,
)

LATIN1_NAME = os.fsdecode(b'caf\xe9')  # a name in Latin-1 bytes, not valid UTF-8


def _ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    return result


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, 'PNG')
    return buf.getvalue()


def _grey16(seed: int) -> np.ndarray:
    """A 16-bit greyscale picture whose values are mostly above 255 (white once clipped to 8 bits)."""
    y, x = np.mgrid[0:40, 0:50]
    return (20000 + 400 * x + 200 * y * (seed + 1)).astype(np.uint16)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob('*')) if p.is_file()}


def _skips(out: Path) -> dict[str | None, str]:
    return {s['key']: s['reason'] for p in sorted((out / 'shards').glob('*.json'))
            for s in json.loads(p.read_text())['skipped']}


def test_every_bad_sample_is_a_row_or_a_skip(tiny, tmp_path):
    """Lone surrogates, json nested 100,000 deep, a non-UTF-8 member name, fields named like the fixed
    columns, 16-bit greyscale, a 1x10000 strip and a 12000x12000 picture: one shard, decoded in a worker."""
    deep = '{"a": ' * 100_000 + '1' + '}' * 100_000
    samples = [  # key, image, json text
        ('k0', _png_bytes(Image.new('RGB', (40, 30), (200, 10, 10))), '{"t": "ok", "n": 1}'),
        ('k1', png(1, 0), '{"t": "\\ud83d", "caption": "c1", "similarity": 2, "image_path": "x", '
                          '"json.caption": "y", "nested": {"\\udc00": ["\\ud83d\\ude00", 1]}}'),
        ('k2', png(2, 0), deep),
        (LATIN1_NAME, png(3, 0), '{"n": 3}'),
        ('k4', _png_bytes(Image.fromarray(_grey16(0))), '{"n": 4}'),
        ('k5', _png_bytes(Image.new('L', (1, 10000), 128)), '{"n": 5}'),
        ('k6', _png_bytes(Image.new('L', (12000, 12000), 40)), '{"n": 6}'),
        ('k7', _png_bytes(Image.fromarray(_grey16(1))), '{"n": 7}'),
    ]
    shard = tmp_path / 'bad.tar'
    with tarfile.open(shard, 'w', format=tarfile.GNU_FORMAT, encoding='utf-8', errors='surrogateescape') as tf:
        for key, image, meta in samples:
            add_member(tf, f'{key}.png', image)
            add_member(tf, f'{key}.txt', f'a caption of {key[:2]}'.encode())
            add_member(tf, f'{key}.json', meta.encode())
    out = tmp_path / 'out'
    result = _ok(run_embed(tiny, shard, '--captions', '--workers', '1', out=out))
    rows = read_folder(out)
    latin1 = name_text(LATIN1_NAME)
    assert latin1 == '"caf\\xe9"' and original_name(latin1) == b'caf\xe9'
    assert list(rows) == ['k0', 'k1', latin1, 'k4', 'k7']
    assert _skips(out) == {'k2': 'bad_json', 'k5': 'image_too_large', 'k6': 'image_too_large'}
    assert '(3 skipped: bad_json 1, image_too_large 2)' in result.stderr

    # every field is kept: renamed past the fixed columns, surrogates as U+FFFD, nested as JSON text
    k1 = rows['k1']
    assert k1['caption'] == 'a caption of k1' and rows[latin1]['caption'] == 'a caption of ca'
    assert k1['t'] == '\ufffd' and k1['json.caption'] == 'c1'
    assert k1['json.similarity'] == 2 and k1['json.image_path'] == 'x' and k1['json.json.caption'] == 'y'
    assert json.loads(k1['nested']) == {'\ufffd': ['\U0001F600', 1]}
    assert rows['k0']['t'] == 'ok' and rows[latin1]['n'] == 3

    # features: the Python API on the same pictures, 16-bit greyscale reduced to 8 bits (v >> 8)
    images = [Image.open(io.BytesIO(samples[i][1])).convert('RGB') for i in (0, 1, 3)]
    images += [Image.fromarray((_grey16(s) >> 8).astype(np.uint8)).convert('RGB') for s in (0, 1)]
    expected, _ = api_features(tiny, images)
    got = np.stack([rows[k]['image'] for k in rows])
    assert np.allclose(got, expected, atol=1e-6)
    # the two 16-bit pictures are not the same white square any more
    assert float(rows['k4']['image'] @ rows['k7']['image']) < 0.999


def test_npy_names_of_any_bytes_one_line_each(tiny, tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    names = ['plain.png', LATIN1_NAME + '.png', 'new\nline.png', '"quoted".png', 'big.png']
    for i, name in enumerate(names):
        (folder / name).write_bytes(png(i, 2) if name != 'big.png' else _png_bytes(Image.new('RGB', (300, 300))))
    out = tmp_path / 'emb.npy'
    (tmp_path / '.emb.npy.notes.tmp').write_text('mine')  # not a temporary file of this tool's: kept
    result = _ok(embed_here(tiny, folder, '--workers', '0', '--max-image-pixels', '50000', out=out))
    assert (tmp_path / '.emb.npy.notes.tmp').read_text() == 'mine'
    assert 'skipped 1 sample(s): ' + str(folder / 'big.png') + ' (image_too_large)' in result.stderr
    lines = out.with_name('emb.paths.txt').read_text(encoding='utf-8').split('\n')
    array = np.load(out)
    listed = sorted(n for n in names if n != 'big.png')
    assert lines[-1] == '' and len(lines) - 1 == len(array) == 4
    assert [os.fsdecode(original_name(line)) for line in lines[:-1]] == [str(folder / n) for n in listed]
    expected, _ = api_features(tiny, [Image.open(folder / n).convert('RGB') for n in listed])
    assert np.allclose(array, expected, atol=1e-6)


def test_npy_killed_between_its_two_renames_never_pairs_other_rows(tiny, tmp_path, monkeypatch):
    """The journal commits FILE.npy and FILE.paths.txt together: after a kill, no FILE.npy stands beside
    the other run's paths, and the next run completes the commit."""
    from eva_open_clip.embed.npy_job import embed_to_npy
    from eva_open_clip.embed.store import npy_file as npy_output
    from eva_open_clip.runtime.encoder import Encoder
    _, model, preprocess, tokenizer = tiny
    encoder = Encoder(model, preprocess, tokenizer, 'cpu', 'fp32')
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(3):
        (folder / f'{i}.png').write_bytes(png(i, 3))
    out = tmp_path / 'emb.npy'
    embed_to_npy(lambda: encoder, [str(folder / '0.png')], out)
    for i in range(3, 40):
        (folder / f'{i:02d}.png').write_bytes(png(i, 3))
    real_replace, calls = os.replace, []

    class Killed(BaseException):
        pass

    def replace_then_die(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the journal, FILE.paths.txt, then FILE.npy
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(npy_output.os, 'replace', replace_then_die)
    with pytest.raises(Killed):
        embed_to_npy(lambda: encoder, [str(folder)], out)
    monkeypatch.undo()
    assert not out.exists() and len(out.with_name('emb.paths.txt').read_text().splitlines()) == 40
    embed_to_npy(lambda: encoder, [str(folder / '0.png')], out)  # completes the commit, then its own job
    assert len(np.load(out)) == 1 and out.with_name('emb.paths.txt').read_text() == f'{folder / "0.png"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.emb.npy.lock', 'emb.npy', 'emb.paths.txt', 'imgs']


def test_a_folder_of_the_users_is_refused_and_left_as_it_is(tiny, tmp_path):
    out = tmp_path / 'mine'
    (out / 'metadata').mkdir(parents=True)
    (out / 'metadata' / 'labels.csv').write_text('a,b\n')
    (out / '.notes.tmp').write_text('notes')
    before = _files(out)
    image = tmp_path / 'a.png'
    image.write_bytes(png(0, 0))
    line = error_line(embed_here(tiny, image, '--workers', '0', out=out), 2)
    assert line == (f'eva-open-clip embed: {out} is not empty and is not an output folder of eva-open-clip embed '
                    f'(no embed.json); give a new or empty folder (nothing in {out} was changed)')
    assert _files(out) == before and sorted(os.listdir(out)) == ['.notes.tmp', 'metadata']
    # what a first run killed before its first write leaves is not the user's: the folder is taken
    early = tmp_path / 'early'
    for sub in ('img_emb', 'shards'):
        (early / sub).mkdir(parents=True)
    (early / '.lock').write_text('host h pid 1\n')
    (early / '.embed.json.abcd1234.tmp').write_text('{"mod')
    _ok(embed_here(tiny, image, '--workers', '0', out=early))
    reference = tmp_path / 'reference'
    _ok(embed_here(tiny, image, '--workers', '0', out=reference))
    same_output(reference, early)


def test_files_of_the_users_inside_an_output_folder_are_kept(tiny, tmp_path):
    image = tmp_path / 'a.png'
    image.write_bytes(png(0, 0))
    reference, out = tmp_path / 'reference', tmp_path / 'out'
    _ok(embed_here(tiny, image, '--workers', '0', out=reference))
    _ok(embed_here(tiny, image, '--workers', '0', out=out))
    mine = {'README.txt': 'mine', '.notes.tmp': 'mine', 'img_emb/NOTES.npy': 'mine', 'shards/notes.json': '{}',
            'metadata/.x.tmp': 'mine', 'ranks/mine.txt': 'mine'}
    for name, text in mine.items():
        (out / name).write_text(text)
    (out / 'img_emb' / 'img_emb_000000007.npy').write_bytes(b'an orphan part of this tool: removed')
    (out / 'shards' / '000000.json').unlink()  # the unit is redone
    _ok(embed_here(tiny, image, '--workers', '0', out=out))
    for name, text in mine.items():
        assert (out / name).read_text() == text
        (out / name).unlink()
    same_output(reference, out)


def test_overlapping_inputs_are_embedded_once(tiny, tmp_path):
    for s in range(3):
        with tarfile.open(tmp_path / f's{s}.tar', 'w') as tf:
            for i in range(2):
                add_member(tf, f's{s}k{i}.png', png(i, s))
    images = tmp_path / 'imgs'
    images.mkdir()
    for i in range(3):
        (images / f'{i}.png').write_bytes(png(i, 9))
    (tmp_path / 'link').symlink_to(images)
    (tmp_path / 'list.txt').write_text(f'{images / "1.png"}\n')
    t = str(tmp_path)
    inputs = [f'{t}/s0.tar', f'{t}/s0.tar', f'{t}/s*.tar', f'{t}/s[01].tar', str(images), f'{images}/./',
              str(tmp_path / 'link'), '--files-from', str(tmp_path / 'list.txt')]
    out, reference = tmp_path / 'out', tmp_path / 'reference'
    result = _ok(embed_here(tiny, *inputs, '--workers', '0', out=out))
    assert (f'note: 11 input file(s) reached more than once are embedded once (e.g. {t}/s0.tar is {t}/s0.tar)'
            in result.stderr)
    _ok(embed_here(tiny, f'{t}/s*.tar', images, '--workers', '0', out=reference))
    same_output(reference, out)
    # a later run spelling the same files otherwise embeds nothing again
    result = _ok(embed_here(tiny, tmp_path / 'link', f'{t}/s{{0..2}}.tar', '--workers', '0', out=out))
    assert 'this run: 0 samples' in result.stderr
    same_rows(out, reference)


def test_damaged_or_lost_bookkeeping_is_rebuilt(tiny, tmp_path):
    images = tmp_path / 'imgs'
    images.mkdir()
    for i in range(10):
        (images / f'm{i}.png').write_bytes(png(i, 4))
    args = (images, '--part-size', '3', '--workers', '0')
    out = tmp_path / 'out'
    _ok(embed_here(tiny, *args, out=out))
    reference = tmp_path / 'reference'
    _ok(embed_here(tiny, *args, out=reference))

    with open(out / 'units.jsonl', 'a') as f:
        f.write('{"unit": 4, "sour')  # a garbage, cut-short last line
    settings = (out / 'embed.json').read_text()
    (out / 'embed.json').write_text(settings[:len(settings) // 2])  # cut short
    result = _ok(embed_here(tiny, *args, out=out))
    assert (f'note: {out / "units.jsonl"} was damaged; rebuilt from the records of the 4 finished unit(s)'
            in result.stderr)
    assert f'note: {out / "embed.json"} was damaged or missing; rebuilt' in result.stderr
    assert 'this run: 0 samples' in result.stderr
    same_output(reference, out)

    (out / 'units.jsonl').unlink()
    for i in range(5):  # files that sort before every recorded one
        (images / f'a{i}.png').write_bytes(png(i, 5))
    result = _ok(embed_here(tiny, *args, out=out))
    assert 'this run: 5 samples' in result.stderr
    grown = tmp_path / 'grown'
    _ok(embed_here(tiny, *args, out=grown))
    rows = same_rows(out, grown)
    assert len(rows) == 15
    no_strays(out)


def test_first_finished_unit_fixes_the_settings(tiny, tmp_path):
    image = tmp_path / 'a.png'
    image.write_bytes(png(0, 0))
    out = tmp_path / 'out'
    typo = str(tiny[0] / 'tiny.ptt')  # a usage error: found before the folder is touched
    result = embed_here(tiny, image, '--workers', '0', out=out, pretrained=typo)
    assert error_line(result, 2) == (f'eva-open-clip embed: --pretrained {typo}: no such file, nor a pretrained '
                                          f'tag of {TINY} (it has no pretrained tags)')
    assert not out.exists()
    damaged = tmp_path / 'damaged.pt'  # found only when the model is loaded, after the folder was prepared
    damaged.write_bytes(b'not a checkpoint')
    result = embed_here(tiny, image, '--workers', '0', out=out, pretrained=str(damaged))
    assert error_line(result, 1).startswith(f'eva-open-clip embed: {damaged}: ')
    assert (out / 'embed.json').exists()
    result = _ok(embed_here(tiny, image, '--workers', '0', out=out))  # the corrected command takes the folder
    assert 'note: no unit of' in result.stderr
    reference = tmp_path / 'reference'
    _ok(embed_here(tiny, image, '--workers', '0', out=reference))
    same_output(reference, out)
    line = error_line(embed_here(tiny, image, '--workers', '0', '--part-size', '7', out=out), 2)
    assert 'holds the output of another embedding run (part_size: 100000 there, 7 now)' in line
    # the batch size decides no row: a smaller one resumes (after an out-of-memory failure, say)
    (tmp_path / 'b.png').write_bytes(png(1, 0))
    _ok(embed_here(tiny, image, tmp_path / 'b.png', '--workers', '0', '--batch-size', '4', out=out))
    assert [json.loads(p.read_text())['batch_size'] for p in sorted((out / 'shards').iterdir())] == [32, 4]
    assert sorted(read_folder(out)) == [str(image), str(tmp_path / 'b.png')]


def test_a_shard_of_more_parts_than_a_thousand(tiny, tmp_path):
    shard = tmp_path / 'many.tar'
    tiny_png = _png_bytes(Image.new('RGB', (8, 8), (9, 9, 9)))
    with tarfile.open(shard, 'w') as tf:
        for i in range(1003):
            add_member(tf, f'{i:05d}.png', tiny_png)
    out = tmp_path / 'out'
    _ok(embed_here(tiny, shard, '--part-size', '1', '--batch-size', '128', '--workers', '0', out=out))
    names = sorted(p.name for p in (out / 'metadata').iterdir())
    assert len(names) == 1003 and names[998:] == [f'metadata_{n}.parquet' for n in (
        '000000998', '00000099900', '00000099901', '00000099902', '00000099903')]
    keys = [pq.read_table(out / 'metadata' / n).column('image_path')[0].as_py() for n in names]
    assert keys == [f'{i:05d}' for i in range(1003)]  # name order is input order


def test_sortable_part_names():
    numbers = [(u, k) for u in (0, 1, 998, 999998, 999999, 1000000, 12345678) for k in (0, 1, 998, 999, 1000, 10**6)]
    names = [part_name(u, k) for u, k in numbers]
    assert sorted(names) == names and len(set(names)) == len(names)
    assert part_name(5, 7) == '000005007' and sortable_number(1000, 3) == '99901'


def test_input_problems_name_the_input(tiny, tmp_path):
    images = tmp_path / 'imgs'
    (images / 'sub').mkdir(parents=True)
    (images / 'sub' / 'a.png').write_bytes(png(0, 0))
    (images / 'up').symlink_to(images)  # a folder that contains itself: walked once
    (images / 'loop.png').symlink_to(images / 'loop.png')
    out = tmp_path / 'out'
    line = error_line(embed_here(tiny, images, '--workers', '0', out=out), 2)
    assert line == (f'eva-open-clip embed: {images / "loop.png"}: Too many levels of symbolic links '
                    f'(in the input folder {images})')
    (images / 'loop.png').unlink()
    (images / 'gone.png').symlink_to(tmp_path / 'nothing.png')
    line = error_line(embed_here(tiny, images, '--workers', '0', out=out), 2)
    assert line == f'eva-open-clip embed: {images / "gone.png"}: no such file (in the input folder {images})'
    (images / 'gone.png').unlink()
    _ok(embed_here(tiny, images, '--workers', '0', out=out))
    assert list(read_folder(out)) == [str(images / 'sub' / 'a.png')]


def test_an_unreadable_input_subfolder_is_named(tiny, tmp_path):
    images = tmp_path / 'imgs'
    (images / 'locked').mkdir(parents=True)
    (images / 'a.png').write_bytes(png(0, 0))
    (images / 'locked').chmod(0)
    # root reads any folder: run it without the capabilities that let it
    drop = ('setpriv', '--bounding-set', '-dac_override,-dac_read_search') if os.geteuid() == 0 else ()
    try:
        result = run_embed(tiny, images, '--workers', '0', out=tmp_path / 'out',
                           launcher=(*drop, *COMMANDS['module']))
    finally:
        (images / 'locked').chmod(0o755)
    line = error_line(result, 2)
    assert line == f'eva-open-clip embed: {images / "locked"}: Permission denied (in the input folder {images})'


def test_files_have_the_mode_the_umask_gives(tiny, tmp_path):
    image = tmp_path / 'a.png'
    image.write_bytes(png(0, 0))
    out = tmp_path / 'out'
    umask = os.umask(0o027)
    try:
        _ok(embed_here(tiny, image, '--workers', '0', out=out))
        _ok(embed_here(tiny, image, '--workers', '0', out=tmp_path / 'emb.npy'))
    finally:
        os.umask(umask)
    made = [p for p in out.rglob('*')] + [tmp_path / 'emb.npy', tmp_path / 'emb.paths.txt']
    modes = {str(p.relative_to(tmp_path)): p.stat().st_mode & 0o777 for p in made}
    assert modes == {k: 0o750 if (tmp_path / k).is_dir() else 0o640 for k in modes}, modes


def test_folders_of_shards_and_images(tiny, tmp_path):
    shards = tmp_path / 'shards'
    shards.mkdir()
    for s in range(2):
        with tarfile.open(shards / f'{s}.tar', 'w') as tf:
            for i in range(3):
                add_member(tf, f's{s}k{i}.png', png(i, s))
    only, reference = tmp_path / 'only', tmp_path / 'reference'
    _ok(embed_here(tiny, shards, '--workers', '0', out=only))
    _ok(embed_here(tiny, shards / '0.tar', shards / '1.tar', '--workers', '0', out=reference))
    same_output(reference, only)
    (shards / 'pic.png').write_bytes(png(5, 5))
    mixed = tmp_path / 'mixed'
    _ok(embed_here(tiny, shards, '--workers', '0', out=mixed))
    assert sorted(read_folder(mixed)) == sorted([str(shards / 'pic.png')]
                                                + [f's{s}k{i}' for s in range(2) for i in range(3)])
    empty = tmp_path / 'empty'
    (empty / 'notes').mkdir(parents=True)
    (empty / 'notes' / 'a.txt').write_text('x')
    line = error_line(embed_here(tiny, empty, '--workers', '0', out=tmp_path / 'o'), 2)
    assert line.startswith(f'eva-open-clip embed: {empty}: the folder holds no image file (.bmp, ')


def test_lists_in_any_bytes(tiny, tmp_path):
    """A --files-from list names files in any bytes (CRLF lines too); a --text-file must be UTF-8 text."""
    image = tmp_path / (LATIN1_NAME + '.png')
    image.write_bytes(png(1, 1))
    listing = tmp_path / 'list.txt'
    listing.write_bytes(os.fsencode(str(image)) + b'\r\n')
    out = tmp_path / 'emb.npy'
    _ok(embed_here(tiny, '--files-from', listing, '--workers', '0', out=out))
    line = out.with_name('emb.paths.txt').read_text(encoding='utf-8')
    assert os.fsdecode(original_name(line.rstrip('\n'))) == str(image)
    assert np.allclose(np.load(out), api_features(tiny, [Image.open(image)])[0], atol=1e-6)
    texts = tmp_path / 'texts.txt'
    texts.write_bytes(b'a dog\ncaf\xe9\n')
    line = error_line(embed_here(tiny, '--text-file', texts, out=out), 2)
    assert line == f'eva-open-clip embed: --text-file {texts}: line 2 is not UTF-8 text'
