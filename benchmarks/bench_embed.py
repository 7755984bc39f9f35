"""Embedding throughput end to end against encode-only, and memory on 1k versus 10k images.

    python benchmarks/bench_embed.py                 # everything (about 20 minutes on 2 cores)
    python benchmarks/bench_embed.py --skip-g14      # tiny model only (about 2 minutes)

Images are generated as webdataset tar shards (JPEG, 320x240 to 640x480, with captions). Each run is a
fresh process of `eva-open-clip embed SHARDS --out DIR`, timed from the end of its first batch to its end
(model loading and worker start-up excluded; the rate and the time spent waiting for decoded images come
from its summary.json), against the same model and batch size encoding already-preprocessed tensors
(`encode-only`: the ceiling for any pipeline), also after one warm-up batch. Figures printed as ratios:

- tiny model, decode-bound: --workers 2 against --workers 0 (decoding in the main process, as before
  DataLoader workers), and each against encode-only;
- g/14 in fp32, model-bound: end-to-end with 2 workers against encode-only over the same number of
  batches; the embed runs' own share of time waiting for decoded images is the pipeline cost seen
  from inside;
- peak RSS of 1k and 10k images (tiny model; flat means streamed).

On a shared virtual machine the speed of a core, and whether two busy processes really get two cores,
varies with the host's load from minute to minute (a g/14 batch took 23 to 35 s here within an hour).
So compared runs alternate in order over --rounds rounds and ratios are of summed rates, and the
benchmark prints, at its start and end, how many cores' worth of work two busy processes got at once:
worker scaling cannot exceed that figure.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from common import encode_only  # noqa: E402

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
    from support.checkpoints import golden, released_state_dict
    config, checkpoint = folder / 'tiny.json', folder / 'tiny.pt'
    config.write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), checkpoint)
    return config, checkpoint


def _g14_checkpoint(folder: Path) -> Path:
    from support.checkpoints import manifest, random_checkpoint
    path = folder / 'g14.pt'
    torch.save(random_checkpoint(manifest('EVA_CLIP_g_14')), path)
    return path


def run_embed(pattern: str, out: Path, model: list[str], workers: int, batch: int) -> dict:
    """One `embed` process: its timed rows and seconds, time waiting for input (summary.json), peak RSS."""
    cmd = [sys.executable, '-m', 'eva_open_clip', *model[:-4], 'embed', pattern, '--out', str(out),
           *model[-4:], '--workers', str(workers), '--batch-size', str(batch)]
    result = subprocess.run(['/usr/bin/time', '-f', 'MAXRSS %M', *cmd], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    rank = json.loads((out / 'summary.json').read_text())['ranks'][0]
    rss = re.search(r'MAXRSS (\d+)', result.stderr)
    return dict(rows=rank['rows'], images_per_s=rank['images_per_s'], seconds=rank['seconds'],
                timed_rows=rank['images_per_s'] * rank['seconds'], input_wait_s=rank['input_wait_s'],
                peak_rss=int(rss.group(1)) * 1024)


_SPIN = ('import time\nstart = time.perf_counter()\nx = 0\nfor i in range(20_000_000):\n    x += i\n'
         'print(time.perf_counter() - start)')


def cpu_capacity() -> float:
    """Cores' worth of work two busy processes get at once against one alone (2.0 on two free cores).

    One alone is timed before and after the pair and the two are averaged. On a shared virtual machine
    this varies with the host's load; ratios that need both cores (worker scaling) are only as high as
    this allows.
    """
    def spin(n: int) -> list[float]:
        procs = [subprocess.Popen([sys.executable, '-c', _SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return [float(p.communicate()[0]) for p in procs]
    before = spin(1)[0]
    together = spin(2)
    alone = (before + spin(1)[0]) / 2
    return sum(alone / t for t in together)


def alternating(rounds: int, first: Any, second: Any) -> Iterator[tuple[int, Any]]:
    """(round, step): first then second in even rounds, second then first in odd ones (cancels drift)."""
    for r in range(rounds):
        for step in ((first, second) if r % 2 == 0 else (second, first)):
            yield r, step


def summed_rate(runs: list[dict]) -> float:
    """Images per second over several runs: their timed images over their timed seconds."""
    return sum(r['timed_rows'] for r in runs) / sum(r['seconds'] for r in runs)


def tiny_rounds(work: Path, tiny: list[str], checkpoint: Path, config: Path, images: int, batch: int,
                rounds: int) -> dict:
    """Serial decoding and 2 workers in alternating order, and encode-only; their summed rates."""
    (work / 'tiny').mkdir()
    pattern = make_shards(work / 'tiny', images)
    runs: dict[int, list[dict]] = {0: [], 2: []}
    for r, workers in alternating(rounds, 0, 2):
        runs[workers].append(run_embed(pattern, work / f'out-tiny-{workers}-{r}', tiny, workers, batch))
    ceiling = encode_only('tiny', checkpoint, batch, batches=1, min_seconds=10, config=config)['images_per_s']
    serial, parallel = summed_rate(runs[0]), summed_rate(runs[2])
    return dict(serial=serial, workers_2=parallel, scaling=parallel / serial, encode_only=ceiling,
                serial_runs=[r['images_per_s'] for r in runs[0]], workers_2_runs=[r['images_per_s'] for r in runs[2]])


def g14_rounds(work: Path, images: int, batch: int, rounds: int) -> dict:
    """End-to-end and encode-only g/14 fp32 runs in alternating order; their summed rates and ratio."""
    g14 = _g14_checkpoint(work)
    (work / 'g14').mkdir()
    pattern = make_shards(work / 'g14', images)
    model = ['--model', 'EVA_CLIP_g_14', '--pretrained', str(g14)]
    timed_batches = math.ceil(images / batch) - 1
    embeds: list[dict] = []
    encodes: list[dict] = []
    for r, step in alternating(rounds, 'embed', 'encode'):
        if step == 'embed':
            embeds.append(run_embed(pattern, work / f'out-g14-{r}', model, 2, batch))
        else:
            encodes.append(encode_only('EVA_CLIP_g_14', g14, batch, batches=timed_batches))
    end_to_end, ceiling = summed_rate(embeds), summed_rate(encodes)
    return dict(images_per_s=end_to_end, encode_only_images_per_s=ceiling, ratio=end_to_end / ceiling,
                input_wait_fraction=sum(e['input_wait_s'] for e in embeds) / sum(e['seconds'] for e in embeds),
                embed_runs=[e['images_per_s'] for e in embeds], encode_only_runs=[e['images_per_s'] for e in encodes])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--images', type=int, default=3000, help='images for the tiny-model throughput runs')
    parser.add_argument('--g14-images', type=int, default=48)
    parser.add_argument('--batch', type=int, default=32)
    parser.add_argument('--g14-batch', type=int, default=8)
    parser.add_argument('--rounds', type=int, default=2, help='alternating rounds of the compared runs')
    parser.add_argument('--skip-tiny', action='store_true')
    parser.add_argument('--skip-g14', action='store_true')
    parser.add_argument('--skip-rss', action='store_true')
    parser.add_argument('--keep', action='store_true', help='keep the generated shards, checkpoints and outputs')
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix='eva-embed-bench-'))
    try:
        run_all(args, work)
    finally:
        if args.keep:
            print(f'kept {work}')
        else:
            shutil.rmtree(work)


def run_all(args: argparse.Namespace, work: Path) -> None:
    config, tiny_ckpt = _tiny_files(work)
    tiny = ['run', '--register', f'tiny={config}', '-m', 'eva_open_clip', '--model', 'tiny',
            '--pretrained', str(tiny_ckpt)]
    results: dict = {}
    capacity = [cpu_capacity()]
    print(f'CPU capacity now: two busy processes together ran at {capacity[0]:.2f}x the rate of one')
    if not args.skip_tiny:
        results['tiny'] = tiny_rounds(work, tiny, tiny_ckpt, config, args.images, args.batch, args.rounds)
        t = results['tiny']
        print(f"tiny model, batch {args.batch}, {args.images} JPEGs, {args.rounds} rounds: serial decode "
              f"{t['serial']:.0f} img/s, 2 workers {t['workers_2']:.0f} img/s (x{t['scaling']:.2f}, target >= 1.7; "
              f"CPU capacity just before: {capacity[0]:.2f}x), "
              f"encode-only {t['encode_only']:.0f} img/s (end-to-end / encode-only: "
              f"{t['workers_2'] / t['encode_only']:.2f})")
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
        g14 = results['g14'] = g14_rounds(work, args.g14_images, args.g14_batch, args.rounds)
        runs = ', '.join(f'{e:.3f}/{o:.3f}' for e, o in zip(g14['embed_runs'], g14['encode_only_runs']))
        print(f"g/14 fp32, batch {args.g14_batch}, 2 workers, {args.rounds} rounds (end-to-end/encode-only "
              f"img/s: {runs}): {g14['images_per_s']:.3f} img/s end-to-end, {g14['encode_only_images_per_s']:.3f} "
              f"img/s encode-only (ratio {g14['ratio']:.3f}, target >= 0.95); waiting for decoded images "
              f"{g14['input_wait_fraction']:.2%} of the end-to-end time")
    capacity.append(cpu_capacity())
    results['cpu_capacity'] = capacity
    print(f'CPU capacity at the start and the end: {capacity[0]:.2f}x and {capacity[1]:.2f}x (2.00: two free cores)')
    print(json.dumps(results))


if __name__ == '__main__':
    main()
