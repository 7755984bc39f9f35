"""Embedding throughput end to end against encode-only, and memory on 1k versus 10k images.

    python benchmarks/bench_embed.py                 # tiny model (decode-bound) and g/14 fp32 (model-bound)
    python benchmarks/bench_embed.py --skip-g14      # tiny model only (about a minute)

Images are generated as webdataset tar shards (JPEG, 320x240 to 640x480, with captions). Each run is a
fresh process of `eva-open-clip embed SHARDS --out DIR`, timed from its first batch to its end (model
loading excluded), against the same model and batch size encoding already-preprocessed tensors
(`encode-only`: the ceiling for any pipeline). Figures printed as ratios:

- tiny model, decode-bound: --workers 2 against --workers 0 (decoding in the main process, as before
  DataLoader workers), and each against encode-only;
- g/14 in fp32, model-bound: end-to-end with workers against encode-only (the pipeline's cost);
- peak RSS of 1k and 10k images (tiny model; flat means streamed).
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))


def make_shards(folder: Path, images: int, per_shard: int = 500) -> str:
    """Tar shards of `images` random-content JPEGs with captions; returns their brace pattern."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    shards = math.ceil(images / per_shard)
    for s in range(shards):
        with tarfile.open(folder / f'{s:05d}.tar', 'w') as tf:
            for i in range(s * per_shard, min(images, (s + 1) * per_shard)):
                w, h = int(rng.integers(320, 641)), int(rng.integers(240, 481))
                pixels = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
                buf = io.BytesIO()
                Image.fromarray(pixels).resize((w, h), Image.BILINEAR).save(buf, 'JPEG', quality=90)
                for ext, data in (('jpg', buf.getvalue()), ('txt', f'image number {i}'.encode())):
                    info = tarfile.TarInfo(f'{i:08d}.{ext}')
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(folder / ('{00000..%05d}.tar' % (shards - 1)))


def _tiny_files(folder: Path) -> tuple[Path, Path]:
    from conftest import golden, released_state_dict
    config, checkpoint = folder / 'tiny.json', folder / 'tiny.pt'
    config.write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), checkpoint)
    return config, checkpoint


def _g14_checkpoint(folder: Path) -> Path:
    from conftest import manifest, random_checkpoint
    path = folder / 'g14.pt'
    torch.save(random_checkpoint(manifest('EVA_CLIP_g_14')), path)
    return path


def run_embed(pattern: str, out: Path, model: list[str], workers: int, batch: int) -> dict:
    """One `embed` process: its rate after the first batch (from its final line) and its peak RSS."""
    cmd = [sys.executable, '-m', 'eva_open_clip', *model[:-4], 'embed', pattern, '--out', str(out),
           *model[-4:], '--workers', str(workers), '--batch-size', str(batch)]
    result = subprocess.run(['/usr/bin/time', '-f', 'MAXRSS %M', *cmd], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    rate = re.search(r'([\d.]+) img/s after the first batch', result.stderr)
    rss = re.search(r'MAXRSS (\d+)', result.stderr)
    return dict(rows=json.loads((out / 'summary.json').read_text())['rows'], images_per_s=float(rate.group(1)),
                peak_rss=int(rss.group(1)) * 1024)


def encode_only(name: str, checkpoint: Path, batch: int, seconds: float, register: Path | None = None) -> float:
    """Images per second of encode_image on ready tensors, same model and batch, in a fresh process."""
    code = f'''
import time, torch, open_clip, eva_open_clip
from eva_open_clip.cpu_memory import keep_freed_memory
if {str(register)!r} != 'None':
    eva_open_clip.register_eva_model({name!r}, {str(register)!r})
model = open_clip.create_model({name!r}, pretrained={str(checkpoint)!r}).eval()
keep_freed_memory()
size = model.visual.preprocess_cfg['size']
size = size[0] if isinstance(size, (tuple, list)) else size
x = torch.randn({batch}, 3, size, size)
with torch.no_grad():
    model.encode_image(x, normalize=True)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < {seconds}:
        model.encode_image(x, normalize=True)
        n += {batch}
print(n / (time.perf_counter() - start))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=3000, help='images for the tiny-model throughput runs')
    parser.add_argument('--g14-images', type=int, default=48)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--g14-batch', type=int, default=8)
    parser.add_argument('--skip-g14', action='store_true')
    parser.add_argument('--skip-rss', action='store_true')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='eva-embed-bench-'))
    config, tiny_ckpt = _tiny_files(work)
    tiny = ['run', '--register', f'tiny={config}', '-m', 'eva_open_clip', '--model', 'tiny', '--pretrained', str(tiny_ckpt)]
    results: dict = {}
    (work / 'tiny').mkdir()
    pattern = make_shards(work / 'tiny', args.images)
    ceiling = encode_only('tiny', tiny_ckpt, args.batch, 10, register=config)
    for workers in (0, 2):
        run = run_embed(pattern, work / f'out-tiny-{workers}', tiny, workers, args.batch)
        results[f'tiny_workers_{workers}'] = dict(images_per_s=run['images_per_s'], rows=run['rows'])
    results['tiny_encode_only_images_per_s'] = ceiling
    serial, parallel = results['tiny_workers_0']['images_per_s'], results['tiny_workers_2']['images_per_s']
    print(f'tiny model, batch {args.batch}, {args.images} JPEGs: serial decode {serial:.0f} img/s, 2 workers '
          f'{parallel:.0f} img/s (x{parallel / serial:.2f}, target >= 1.7), encode-only {ceiling:.0f} img/s '
          f'(end-to-end / encode-only: {parallel / ceiling:.2f})')
    if not args.skip_rss:
        rss = {}
        for n in (1000, 10000):
            folder = work / f'rss-{n}'
            folder.mkdir()
            rss[n] = run_embed(make_shards(folder, n), work / f'out-rss-{n}', tiny, 2, args.batch)['peak_rss']
        results['peak_rss_1k'], results['peak_rss_10k'] = rss[1000], rss[10000]
        print(f'peak RSS (main process, tiny model, 2 workers): 1k images {rss[1000] / 1e9:.2f} GB, 10k images '
              f'{rss[10000] / 1e9:.2f} GB (ratio {rss[10000] / rss[1000]:.2f})')
    if not args.skip_g14:
        g14 = _g14_checkpoint(work)
        (work / 'g14').mkdir()
        pattern = make_shards(work / 'g14', args.g14_images)
        model = ['--model', 'EVA_CLIP_g_14', '--pretrained', str(g14)]
        rate = run_embed(pattern, work / 'out-g14', model, 2, args.g14_batch)['images_per_s']
        ceiling = encode_only('EVA_CLIP_g_14', g14, args.g14_batch, 60)
        results['g14'] = dict(images_per_s=rate, encode_only_images_per_s=ceiling, ratio=rate / ceiling)
        print(f'g/14 fp32, batch {args.g14_batch}, 2 workers: {rate:.3f} img/s end-to-end, {ceiling:.3f} img/s '
              f'encode-only (ratio {rate / ceiling:.2f}, target >= 0.95)')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
