"""What a run uses where its user did not say: the device's defaults (bf16, batches of 256 and fast decoding on a
GPU; fp32, 32 and exact on the CPU), said in the run's first line and recorded in its folder, which a resumed
run follows; a `--decode fast` run's parts are the same across worker counts and after a kill; `--compile`
gives eager's rows within a bound."""
from __future__ import annotations

import io
import json
import signal
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from support.cli import error_line
from support.embed import add_member, embed_here, read_folder, run_embed, same_output


def _jpeg(seed: int, width: int, height: int) -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)).resize(
        (width, height), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


@pytest.fixture(scope='module')
def jpeg_shards(tmp_path_factory) -> str:
    """Four shards of JPEGs, small (decoded at full scale) and large (drafted), with a PNG among them."""
    root = tmp_path_factory.mktemp('jpegs')
    for s in range(4):
        with tarfile.open(root / f'j-{s}.tar', 'w') as tf:
            for i in range(12):
                size = (500, 375) if i % 3 else (300, 200)
                add_member(tf, f'{s}{i:03d}.jpg', _jpeg(s * 100 + i, *size))
                add_member(tf, f'{s}{i:03d}.txt', f'picture {i} of {s}'.encode())
            buffer = io.BytesIO()
            Image.new('RGB', (90, 60), (s * 40, 20, 200)).save(buffer, 'PNG')
            add_member(tf, f'{s}999.png', buffer.getvalue())
    return str(root / 'j-{0..3}.tar')


def test_a_folder_records_its_precision_and_decoding_and_a_resume_follows_them(tiny, jpeg_shards, tmp_path):
    out = tmp_path / 'out'
    first = embed_here(tiny, jpeg_shards.replace('{0..3}', '{0..1}'), '--precision', 'bf16', '--decode', 'fast',
                       '--workers', '1', out=out)
    assert first.returncode == 0, first.stderr[-2000:]
    assert first.stderr.splitlines()[0] == ('embedding with test-tiny_a on cpu: precision bf16, batch_size 32 '
                                            '(the default on the CPU), decode fast, 1 worker')
    settings = json.loads((out / 'embed.json').read_text())
    assert (settings['precision'], settings['decode']) == ('bf16', 'fast')
    # the same job, grown, resumed with no precision and decoding said (as on another machine): the folder's
    resumed = embed_here(tiny, jpeg_shards, '--workers', '1', out=out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert resumed.stderr.splitlines()[0] == (
        f'embedding with test-tiny_a on cpu: precision bf16 (as {out} was made), batch_size 32 (the default on the '
        f'CPU), decode fast (as {out} was made), 1 worker')
    records = [json.loads(p.read_text()) for p in sorted((out / 'shards').iterdir())]
    assert [(r['settings']['precision'], r['settings']['decode']) for r in records] == [('bf16', 'fast')] * 4
    line = error_line(embed_here(tiny, jpeg_shards, '--decode', 'exact', out=out), 2)
    assert line.startswith(f'eva-open-clip embed: {out} holds the output of another embedding run (decode: '
                           f"'fast' there, 'exact' now)")


def test_fast_parts_are_the_same_across_workers_and_after_a_kill(tiny, jpeg_shards, tmp_path):
    args = (jpeg_shards, '--captions', '--decode', 'fast', '--part-size', '5', '--batch-size', '4')
    reference = tmp_path / 'reference'
    assert embed_here(tiny, *args, '--workers', '2', out=reference).returncode == 0
    out = tmp_path / 'killed'
    process = run_embed(tiny, *args, '--workers', '1', out=out, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None and not list((out / 'shards').glob('*.json')):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert len(list((out / 'shards').glob('*.json'))) < 4
    assert embed_here(tiny, *args, '--workers', '1', out=out).returncode == 0
    same_output(reference, out)
    exact = tmp_path / 'exact'
    assert embed_here(tiny, *args[:2], '--decode', 'exact', *args[4:], '--workers', '2', out=exact).returncode == 0
    fast_rows, exact_rows = read_folder(reference), read_folder(exact)
    assert sorted(fast_rows) == sorted(exact_rows)
    cosines = [float(fast_rows[k]['image'] @ exact_rows[k]['image']) for k in fast_rows]
    assert min(cosines) >= 0.98 and all(fast_rows[k]['image'].tolist() == exact_rows[k]['image'].tolist()
                                         for k in fast_rows if k.endswith('999'))  # a PNG: decoded the exact way


def test_compiled_rows_are_eager_rows(tiny, jpeg_shards, tmp_path):
    """`--compile` (torch.compile with inductor, fullgraph; one graph for every batch, the last padded). In a
    process of its own: inductor keeps its compile workers for the life of the process that compiled."""
    args = (jpeg_shards.replace('{0..3}', '{0..1}'), '--captions', '--batch-size', '8', '--workers', '1')
    eager, compiled = tmp_path / 'eager', tmp_path / 'compiled'
    assert embed_here(tiny, *args, out=eager).returncode == 0
    result = run_embed(tiny, *args, '--compile', out=compiled, new_process=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith('embedding with ')][0].endswith(', compiled')
    a, b = read_folder(eager), read_folder(compiled)
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.allclose(a[key]['image'], b[key]['image'], atol=1e-5), key
        assert np.allclose(a[key]['text'], b[key]['text'], atol=1e-5), key
