"""`eva-open-clip embed --out DIR`: webdataset shards and folders, resumable parts, torchrun, damaged data.

Runs the command line (in this process, or a new one where a test needs it) on a tiny EVA model, on tar
shards generated here with a few hundred samples, some of them damaged on purpose. Every row is checked
against the Python API's features of the sample its metadata names.
"""
from __future__ import annotations

import io
import json
import multiprocessing
import signal
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from eva_open_clip.embed.loader import Batch, DecodedBatches, UnitDataset
from eva_open_clip.embed.units import list_units
from eva_open_clip.errors import ToolError
from eva_open_clip.runtime.pixels import Pixels
from support.checkpoints import DATA
from support.cli import TORCHRUN
from support.embed import TINY
from support.embed import add_member as _add
from support.embed import api_features as _api_features
from support.embed import png as _png
from support.embed import read_folder as _read
from support.embed import run_embed as _embed
from support.embed import same_output as _same_output

SHARDS, PER_SHARD = 5, 60


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
                    damaged[key] = 'undecodable_image'
                elif i == 8:
                    damaged[key] = 'no_image'  # caption only
                elif i == 9:
                    _add(tf, f'{key}.png', image)
                    damaged[key] = 'caption_not_text'
                    caption = None
                    _add(tf, f'{key}.txt', b'\xff\xfe\xfa not text')
                elif i == 10:
                    _add(tf, f'{key}.png', image)
                    _add(tf, f'{key}.json', b'{not json')
                    damaged[key] = 'bad_json'
                else:
                    _add(tf, f'{key}.png', image)
                    good[key] = (image, caption, meta)
                if caption is not None:
                    _add(tf, f'{key}.txt', caption.encode())
                if i not in (10,):
                    _add(tf, f'{key}.json', json.dumps(meta).encode())
    # a truncated shard: its samples before the damage are read, then the damage is reported once
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
    assert 'img/s' in result.stderr and f'embedded {len(rows)} samples of 7 units' in result.stderr
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
        assert skipped[key] == reason, (key, skipped[key])
    cut_skips = records[str(root / 'shard-00005.tar')]['skipped']
    assert len(cut_skips) == 1 and cut_skips[0]['reason'] == 'damaged_tar'  # the one damage, once
    cut_key = cut_skips[0]['key']  # the sample the cut went through: every sample before it is kept
    assert cut_key == f'99999{len(cut):04d}' and f'inside the header of member {cut_key}.txt' in cut_skips[0]['detail']
    assert records[str(root / 'shard-00006.tar')]['rows'] == 0
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rows'] == len(rows) and summary['units'] == 7
    assert summary['skipped'] == len(damaged) + len(cut_skips) and summary['model'] == TINY
    rank = summary['ranks'][0]
    assert 0 <= rank['input_wait_s'] <= rank['seconds'] and rank['images_per_s'] > 0


def test_the_share_spent_waiting_is_of_the_rates_own_time(dataset, tiny, tmp_path):
    """A shard that arrives late, before the rate's clock starts (after the first batch), is start-up, not
    time spent waiting for decoded images: the share the last line and the summary give is at most the whole."""
    root = dataset[0]
    late = f'pipe:sleep 3; cat {root / "shard-00001.tar"}'  # one batch each: the second comes 3 s late
    out = tmp_path / 'out'
    result = _embed(tiny, root / 'shard-00000.tar', late, '--batch-size', '64', '--workers', '2', out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    rank = json.loads((out / 'summary.json').read_text())['ranks'][0]
    assert rank['rows'] + rank['skipped'] == 2 * PER_SHARD and rank['images_per_s'] > 0
    assert 0 <= rank['input_wait_s'] <= rank['seconds']


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
    assert summary['skipped'] == 1 and summary['skipped_by_reason'] == {'undecodable_image': 1}


def test_worker_pixels_are_the_preprocessed_files_bit_for_bit(tiny):
    _, _, preprocess, _ = tiny
    paths = [str(DATA / 'images' / n) for n in ('clip_diagram_rgba.png', 'noise_gray_64x96.png', 'palette_120.png')]
    pixels = Pixels(preprocess)  # the workers hand over uint8 pixels; the device scales and normalizes them
    data = UnitDataset(list_units(paths, None, 10)[0], pixels, batch_size=8)
    batch = next(iter(torch.utils.data.DataLoader(data, batch_size=None, num_workers=1)))
    assert batch.keys == paths and batch.pixels.dtype == torch.uint8
    assert torch.equal(pixels.to_model(batch.pixels, torch.float32),
                       torch.stack([preprocess(Image.open(p)) for p in paths]))


class _SlowlyDecoded(torch.utils.data.IterableDataset):
    """Batches of one sample, each after 0.1 s of waiting, reporting `decode_s` CPU seconds of decoding."""

    def __init__(self, batches: int, decode_s: float = 0.0, wait_s: float = 0.1):
        self.batches, self.decode_s, self.wait_s = batches, decode_s, wait_s

    def __iter__(self):
        for i in range(self.batches):
            time.sleep(self.wait_s)
            yield Batch(0, keys=[str(i)], decode_s=self.decode_s)


@pytest.mark.parametrize('model_seconds', [0.0, 0.3])
def test_the_wait_for_decoded_batches_is_measured(model_seconds):
    batches = DecodedBatches(_SlowlyDecoded(5), 1, 'cpu')
    started = None
    for expected, batch in enumerate(batches):
        assert batch.keys == [str(expected)]
        started = started or batches.start_clock()  # the rate starts after the first batch
        time.sleep(model_seconds)
    measured = time.perf_counter() - started
    if model_seconds:  # the model is the bottleneck: the worker decoded ahead, nothing to wait for
        assert measured >= 1.2 and batches.waited < 0.1 * measured
    else:  # decoding is: the model waited for each of the four batches after the first
        assert 0.3 <= batches.waited <= measured


class _OneWorkerFails(torch.utils.data.IterableDataset):
    """Worker 1 fails at once; worker 0 decodes on for 20 s."""

    def __iter__(self):
        if torch.utils.data.get_worker_info().id == 1:
            raise ValueError('a sample no worker could take')
        for i in range(2000):
            time.sleep(0.01)
            yield Batch(0, keys=[str(i)])


def test_a_job_stopped_by_an_error_ends_its_decoding_workers_at_once():
    """While the error is held with the loader's frames in its traceback, as a notebook holds the last one."""
    with pytest.raises(ValueError, match='in DataLoader worker process 1') as failure:
        for _ in DecodedBatches(_OneWorkerFails(), 2, 'cpu'):
            pass
    assert failure.value.__traceback__ is not None
    assert not multiprocessing.active_children()


@pytest.mark.parametrize('decode_s, fewer', [(1.0, True), (0.0, False)])
def test_model_threads_make_room_for_workers_only_when_decoding_costs_more(decode_s, fewer):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(4)
        batches = DecodedBatches(_SlowlyDecoded(DecodedBatches.DECIDE_AFTER + 2, decode_s), 2, 'cpu')
        during = []
        for _ in batches:
            sum(range(20_000))  # the model's work: well under a second of CPU time per image
            during.append(torch.get_num_threads())
        assert during[-1] == (2 if fewer else 4)
        assert torch.get_num_threads() == 4  # given back when the batches end
    finally:
        torch.set_num_threads(threads)


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
    assert f'this run: {total - sum(r["rows"] for r in done)} samples on 1 rank' in result.stderr
    _same_output(reference, out)
    assert not list(out.rglob('.*.tmp'))
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['rows'] == total and summary['ranks'][0]['units'] == 7 - len(done)


def test_changed_settings_are_refused(dataset, tiny, tmp_path):
    root, _, _ = dataset
    out = tmp_path / 'out'
    assert _embed(tiny, root / 'shard-00000.tar', '--part-size', '25', out=out).returncode == 0
    for changed in (['--part-size', '30'], ['--captions'], ['--max-image-pixels', '1000']):
        result = _embed(tiny, root / 'shard-00000.tar', '--part-size', '25', *changed, out=out)
        assert result.returncode == 2 and 'another embedding run' in result.stderr, result.stderr[-2000:]
    # the batch size decides no row: another one resumes (tests/test_embed_inputs.py checks the rows)
    assert _embed(tiny, root / 'shard-00000.tar', '--part-size', '25', '--batch-size', '4', out=out).returncode == 0
    result = _embed(tiny, root / 'shard-00001.tar', '--part-size', '25', out=out)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == (
        f'eva-open-clip embed: {root / "shard-00000.tar"}: embedded into {out} before, but no longer among the '
        f'inputs; restore it, or embed into a new --out folder (the inputs of {out} are listed in '
        f'{out / "units.jsonl"})')


def test_torchrun_two_ranks_equal_one_process(dataset, tiny, tmp_path):
    root, _, _ = dataset
    args = (_pattern(root), '--captions', '--part-size', '25', '--batch-size', '8', '--workers', '1')
    single = tmp_path / 'single'
    assert _embed(tiny, *args, out=single).returncode == 0
    ranks = tmp_path / 'ranks'
    result = _embed(tiny, *args, out=ranks, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    a, b = _read(single), _read(ranks)
    assert list(a) == list(b)
    for key in a:
        assert np.allclose(a[key]['image'], b[key]['image'], atol=1e-6)
        assert np.allclose(a[key]['text'], b[key]['text'], atol=1e-6) and a[key]['part'] == b[key]['part']
    summary = json.loads((ranks / 'summary.json').read_text())
    assert [r['rank'] for r in summary['ranks']] == [0, 1] and sum(r['rows'] for r in summary['ranks']) == len(a)
    assert [r['units'] for r in summary['ranks']] == [4, 3]


def test_a_stalled_worker_stops_the_job_in_one_line():
    batches = DecodedBatches(_SlowlyDecoded(2, wait_s=30), 1, 'cpu')
    batches.STALLED_S = 2
    started = time.perf_counter()
    with pytest.raises(ToolError, match=r'^no decoded batch came for 2 s \(a stalled read of a shard\?\); run the '
                                        r'same command to resume$'):
        list(batches)
    assert time.perf_counter() - started < 25
