"""`eva-open-clip embed --out DIR`: webdataset shards and folders, resumable parts, torchrun, damaged data.

Runs the command line in subprocesses on a tiny EVA model (registered with `run --register`), on tar
shards generated here with a few hundred samples, some of them damaged on purpose. Every row is checked
against the Python API's features of the sample its metadata names.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from eva_open_clip.data import UnitDataset, iter_units
from eva_open_clip.embed import DecodedBatches
from conftest import DATA, golden, model_name, released_state_dict

SHARDS, PER_SHARD = 5, 60


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _png(i: int, shard: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (30 + i % 17, 24 + i % 11), ((i * 37) % 256, (shard * 60) % 256, (i * 11) % 256)).save(buf, 'PNG')
    return buf.getvalue()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    """Shards with captions and json; damaged samples; a truncated shard and an empty one."""
    root = tmp_path_factory.mktemp('wds')
    good: dict[str, tuple[bytes, str, dict]] = {}
    damaged: dict[str, str] = {}
    for s in range(SHARDS):
        with tarfile.open(root / f'shard-{s:05d}.tar', 'w') as tf:
            for i in range(PER_SHARD):
                key = f'{s:05d}{i:04d}'
                image, caption, meta = _png(i, s), f'sample {i} of shard {s}', {'url': f'http://x/{key}', 'w': i}
                if i == 7:
                    _add(tf, f'{key}.png', b'\x89PNG\r\n\x1a\n broken')  # undecodable image
                    damaged[key] = 'undecodable image'
                elif i == 8:
                    damaged[key] = 'no image'  # caption only
                elif i == 9:
                    _add(tf, f'{key}.png', image)
                    damaged[key] = 'caption is not UTF-8 text'
                    caption = None
                    _add(tf, f'{key}.txt', b'\xff\xfe\xfa not text')
                elif i == 10:
                    _add(tf, f'{key}.png', image)
                    _add(tf, f'{key}.json', b'{not json')
                    damaged[key] = 'json is not a JSON object'
                else:
                    _add(tf, f'{key}.png', image)
                    good[key] = (image, caption, meta)
                if caption is not None:
                    _add(tf, f'{key}.txt', caption.encode())
                if i not in (10,):
                    _add(tf, f'{key}.json', json.dumps(meta).encode())
    # a truncated shard: its first samples are read, then the damage is reported
    whole = root / 'whole.tar'
    with tarfile.open(whole, 'w') as tf:
        for i in range(20):
            key = f'99999{i:04d}'
            _add(tf, f'{key}.png', _png(i, 9))
            _add(tf, f'{key}.txt', f'sample {i} of the cut shard'.encode())
    data = whole.read_bytes()
    (root / 'shard-00005.tar').write_bytes(data[:len(data) // 2 + 100])
    whole.unlink()
    with tarfile.open(root / 'shard-00006.tar', 'w'):
        pass  # an empty shard
    return root, good, damaged


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp('tiny')
    (folder / 'tiny.json').write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), folder / 'tiny.pt')
    model, _, preprocess = open_clip.create_model_and_transforms(model_name('tiny_a'), pretrained=str(folder / 'tiny.pt'))
    return folder, model.eval(), preprocess, open_clip.get_tokenizer(model_name('tiny_a'))


def _api_features(tiny, images: list, captions: list | None = None):
    _, model, preprocess, tokenizer = tiny
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(tokenizer(captions), normalize=True) if captions else None
    return image.numpy(), None if text is None else text.numpy()


def _embed(tiny, *args, out, launcher=(sys.executable, '-m', 'eva_open_clip'), background=False):
    folder = tiny[0]
    cmd = [*launcher, 'run', '--register', f'tiny={folder / "tiny.json"}', '-m', 'eva_open_clip', 'embed',
           *map(str, args), '--out', str(out), '--model', 'tiny', '--pretrained', str(folder / 'tiny.pt')]
    env = dict(os.environ)
    if background:
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)


def _read(out: Path) -> dict[str, dict]:
    """Every row of an output folder, by key: image/text features and metadata; checks alignment."""
    rows = {}
    for meta_path in sorted((out / 'metadata').glob('metadata_*.parquet')):
        n = meta_path.stem.split('_')[1]
        meta = pq.read_table(meta_path).to_pylist()
        image = np.load(out / 'img_emb' / f'img_emb_{n}.npy')
        text_path = out / 'text_emb' / f'text_emb_{n}.npy'
        text = np.load(text_path) if text_path.exists() else None
        assert image.dtype == np.float32 and len(image) == len(meta) and (text is None or len(text) == len(meta))
        for i, row in enumerate(meta):
            assert row['image_path'] not in rows
            rows[row['image_path']] = dict(row, image=image[i], text=None if text is None else text[i], part=n)
    return rows


def _pattern(root):
    return str(root / 'shard-{00000..00006}.tar')


def test_shards_with_captions_give_the_api_features_row_for_row(dataset, tiny, tmp_path):
    root, good, damaged = dataset
    out = tmp_path / 'out'
    result = _embed(tiny, _pattern(root), '--captions', '--part-size', '25', '--batch-size', '8', '--workers', '2',
                    out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    # a clean run prints no warning (open_clip < 2.26 itself warns on import that timm.models.layers moved)
    lines = [line for line in result.stderr.splitlines() if 'please import via timm.layers' not in line]
    assert not any('Warning' in line or 'warning' in line for line in lines), result.stderr[-2000:]
    rows = _read(out)
    cut = {k for k in rows if k.startswith('99999')}
    assert set(rows) == set(good) | cut and 1 <= len(cut) < 20
    assert 'img/s' in result.stderr and f'embedded {len(rows)} samples of 7 input shards' in result.stderr
    assert 'waiting for decoded images)' in result.stderr
    keys = sorted(good)
    images = [Image.open(io.BytesIO(good[k][0])) for k in keys]
    image, text = _api_features(tiny, images, [good[k][1] for k in keys])
    for i, key in enumerate(keys):
        row = rows[key]
        assert np.allclose(row['image'], image[i], atol=1e-5) and np.allclose(row['text'], text[i], atol=1e-5), key
        assert row['caption'] == good[key][1] and row['url'] == good[key][2]['url'] and row['w'] == good[key][2]['w']
        assert row['similarity'] == pytest.approx(float(image[i] @ text[i]), abs=1e-5)
    assert np.allclose(np.linalg.norm(np.stack([r['image'] for r in rows.values()]), axis=1), 1, atol=1e-5)
    # parts: at most --part-size rows, named so that name order is input order
    parts = sorted(p.stem.split('_')[2] for p in (out / 'img_emb').glob('*.npy'))
    assert [n[:6] for n in parts] == sorted(n[:6] for n in parts) and all(len(np.load(
        out / 'img_emb' / f'img_emb_{n}.npy')) <= 25 for n in parts)
    assert list(rows) == sorted(rows)  # within and across shards, rows keep the input order
    # damaged samples: counted per shard with their reason, in the summary, never a row
    records = {json.loads(p.read_text())['source']: json.loads(p.read_text()) for p in (out / 'shards').glob('*.json')}
    skipped = {s['key']: s['reason'] for r in records.values() for s in r['skipped']}
    for key, reason in damaged.items():
        assert skipped[key].startswith(reason), (key, skipped[key])
    cut_skips = records[str(root / 'shard-00005.tar')]['skipped']
    assert cut_skips[-1]['key'] is None and cut_skips[-1]['reason'].startswith('damaged tar')
    assert all(s['key'] is None or s['key'].startswith('99999') for s in cut_skips)  # at most the cut sample
    assert records[str(root / 'shard-00006.tar')]['rows'] == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rows'] == len(rows) and summary['units'] == 7
    assert summary['skipped'] == len(damaged) + len(cut_skips) and summary['model'] == 'tiny'
    rank = summary['ranks'][0]
    assert 0 <= rank['input_wait_s'] <= rank['seconds'] and rank['images_per_s'] > 0


def test_folders_and_file_lists(dataset, tiny, tmp_path):
    folder = tmp_path / 'images'
    (folder / 'sub').mkdir(parents=True)
    names = ['gradient_rgb_300x200.png', 'palette_120.png', 'noise_gray_64x96.png']
    for name in names:
        (folder / 'sub' / name).write_bytes((DATA / 'images' / name).read_bytes())
    (folder / 'a_broken.png').write_bytes(b'\x89PNG\r\n\x1a\nbroken')
    listing = tmp_path / 'list.txt'
    listing.write_text(f'{DATA / "images" / "clip_diagram_rgba.png"}\n')
    out = tmp_path / 'out'
    result = _embed(tiny, folder, '--files-from', listing, '--part-size', '2', out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _read(out)
    expected = [str(folder / 'sub' / n) for n in sorted(names)] + [str(DATA / 'images' / 'clip_diagram_rgba.png')]
    assert list(rows) == expected
    image, _ = _api_features(tiny, [Image.open(p) for p in expected])
    assert np.allclose(np.stack([rows[k]['image'] for k in expected]), image, atol=1e-5)
    assert 'caption' not in pq.read_table(next((out / 'metadata').glob('*.parquet'))).column_names
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['skipped'] == 1 and summary['skipped_by_reason'] == {'undecodable image': 1}


def test_worker_pixels_are_the_preprocessed_files_bit_for_bit(tiny):
    _, _, preprocess, _ = tiny
    paths = [str(DATA / 'images' / n) for n in ('clip_diagram_rgba.png', 'noise_gray_64x96.png', 'palette_120.png')]
    data = UnitDataset(lambda: iter_units(paths, None, 10), preprocess, batch_size=8)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=1)))
    assert batch['keys'] == paths
    assert torch.equal(batch['pixels'], torch.stack([preprocess(Image.open(p)) for p in paths]))


class _SlowlyDecoded(torch.utils.data.IterableDataset):
    """Batches of one sample, each after 0.1 s of waiting, reporting `decode_s` CPU seconds of decoding."""

    def __init__(self, batches: int, decode_s: float = 0.0):
        self.batches, self.decode_s = batches, decode_s

    def __iter__(self):
        for i in range(self.batches):
            time.sleep(0.1)
            yield dict(keys=[str(i)], decode_s=self.decode_s)


@pytest.mark.parametrize('model_seconds', [0.0, 0.3])
def test_the_wait_for_decoded_batches_is_measured(model_seconds):
    batches = DecodedBatches(_SlowlyDecoded(5), 1, 'cpu')
    started = None
    for expected, batch in enumerate(batches):
        assert batch['keys'] == [str(expected)]
        started = started or time.perf_counter()
        time.sleep(model_seconds)
    measured = time.perf_counter() - started
    if model_seconds:  # the model is the bottleneck: the worker decoded ahead, nothing to wait for
        assert measured >= 1.2 and batches.waited < 0.1 * measured
    else:  # decoding is: the model waited for each of the four batches after the first
        assert 0.3 <= batches.waited <= measured


@pytest.mark.parametrize('decode_s, fewer', [(1.0, True), (0.0, False)])
def test_model_threads_make_room_for_workers_only_when_decoding_costs_more(decode_s, fewer):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        batches = DecodedBatches(_SlowlyDecoded(DecodedBatches.DECIDE_AFTER + 2, decode_s), 2, 'cpu')
        for _ in batches:
            sum(range(20_000))  # the model's work: well under a second of CPU time per image
        assert torch.get_num_threads() == (2 if fewer else 4)
    finally:
        torch.set_num_threads(threads)


def _same_output(a: Path, b: Path) -> None:
    files_a = sorted(str(p.relative_to(a)) for p in a.rglob('*') if p.is_file() and p.name != 'summary.json')
    files_b = sorted(str(p.relative_to(b)) for p in b.rglob('*') if p.is_file() and p.name != 'summary.json')
    assert files_a == files_b
    for name in files_a:
        if name.endswith('.npy'):
            assert np.array_equal(np.load(a / name), np.load(b / name)), name
        elif name.endswith('.parquet'):
            assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
        else:
            assert (a / name).read_text() == (b / name).read_text(), name


def test_killed_run_resumes_to_the_uninterrupted_output(dataset, tiny, tmp_path):
    root, _, _ = dataset
    args = (_pattern(root), '--captions', '--part-size', '25', '--batch-size', '2', '--workers', '1')
    reference = tmp_path / 'reference'
    assert _embed(tiny, *args, out=reference).returncode == 0
    out = tmp_path / 'killed'
    process = _embed(tiny, *args, out=out, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and len(list((out / 'shards').glob('*.json'))) < 2:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = [json.loads(p.read_text()) for p in (out / 'shards').glob('*.json')]
    assert process.returncode == -signal.SIGKILL and 1 <= len(done) < 7
    result = _embed(tiny, *args, out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    total = json.loads((reference / 'summary.json').read_text())['rows']
    assert f'this run: {total - sum(r["rows"] for r in done)} samples on 1 rank(s)' in result.stderr
    _same_output(reference, out)
    assert not list(out.rglob('.*.tmp'))
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rows'] == total and summary['ranks'][0]['units'] == 7 - len(done)


def test_changed_settings_are_refused(dataset, tiny, tmp_path):
    root, _, _ = dataset
    out = tmp_path / 'out'
    assert _embed(tiny, root / 'shard-00000.tar', '--part-size', '25', out=out).returncode == 0
    for changed in (['--part-size', '30'], ['--captions'], ['--batch-size', '4']):
        result = _embed(tiny, root / 'shard-00000.tar', '--part-size', '25', *changed, out=out)
        assert result.returncode == 1 and 'another embedding run' in result.stderr, result.stderr[-2000:]
    result = _embed(tiny, root / 'shard-00001.tar', '--part-size', '25', out=out)
    assert result.returncode == 1 and "inputs: [" in result.stderr


def test_torchrun_two_ranks_equal_one_process(dataset, tiny, tmp_path):
    root, _, _ = dataset
    args = (_pattern(root), '--captions', '--part-size', '25', '--batch-size', '8', '--workers', '1')
    single = tmp_path / 'single'
    assert _embed(tiny, *args, out=single).returncode == 0
    ranks = tmp_path / 'ranks'
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                '-m', 'eva_open_clip')
    result = _embed(tiny, *args, out=ranks, launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _read(single), _read(ranks)
    assert list(a) == list(b)
    for key in a:
        assert np.allclose(a[key]['image'], b[key]['image'], atol=1e-6)
        assert np.allclose(a[key]['text'], b[key]['text'], atol=1e-6) and a[key]['part'] == b[key]['part']
    summary = json.loads((ranks / 'summary.json').read_text())
    assert [r['rank'] for r in summary['ranks']] == [0, 1] and sum(r['rows'] for r in summary['ranks']) == len(a)
    assert [r['units'] for r in summary['ranks']] == [4, 3]
