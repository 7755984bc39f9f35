"""Decoding for `embed` on this machine: `--decode exact` against `--decode fast`, and `embed` against the pipeline
clip-retrieval runs.

    python benchmarks/bench_decode.py            # every section (a few minutes on 2 cores)
    python benchmarks/bench_decode.py --section per_core

Sections (each prints one JSON line as it finishes):

- `per_core`: ms per picture on one core (one torch thread) for JPEGs of 256x256, 500x375 and 1600x1200: what a
  decoding worker does per picture with open_clip's preprocess on PIL (clip-retrieval's work, float32 out),
  with `--decode exact` (the same, 8-bit pixels out) and with `--decode fast`.
- `end_to_end`: images/s of `embed --decode fast` with one decoding worker, against clip-retrieval's reading
  pipeline (webdataset shards, PIL and open_clip's preprocess in one DataLoader worker, the same model and
  batch), on shards of 500x375 and of 1600x1200 JPEGs, with a tiny model at 224 px (so decoding is the
  bottleneck). Goal: >= 1.8x at 500x375, >= 2.5x at 1600x1200.
- `fidelity`: how far `fast` moves the features of full-size EVA02-CLIP-B-16 (synthetic weights, whose
  activations depend on the input) at 224 px: cosine to `exact`, least and mean, over 48 JPEGs.
- `compile`: what `--compile` does on this CPU: encode_image of the tiny 224-px model and of B-16 at batch 8,
  eager against compiled (inductor), and the seconds compiling took.
"""
from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
from common import run_sections  # noqa: E402

SIZES = [(256, 256), (500, 375), (1600, 1200)]


def _photo(width: int, height: int, seed: int) -> bytes:
    """A JPEG of a smooth picture (random colours, bilinearly enlarged), quality 90, as photographs compress."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(small).resize((width, height), Image.BILINEAR).save(buffer, 'JPEG', quality=90)
    return buffer.getvalue()


def _transform(size: int = 224):
    import open_clip
    return open_clip.image_transform(size, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN,
                                     std=open_clip.OPENAI_DATASET_STD, resize_mode='shortest', interpolation='bicubic')


def per_core() -> dict:
    from PIL import Image

    from eva_open_clip.runtime.pixels import Pixels
    torch.set_num_threads(1)
    transform = _transform()
    exact, fast = Pixels(transform, 'exact'), Pixels(transform, 'fast')
    ways = {'clip_retrieval': lambda data: transform(Image.open(io.BytesIO(data))),
            'exact': exact.prepare, 'fast': fast.prepare}
    rows = []
    for width, height in SIZES:
        pictures = [_photo(width, height, seed) for seed in range(12)]
        times = {name: [] for name in ways}
        for _ in range(4):  # the ways take turns, so that the allocator's state weighs on each alike
            for name, way in ways.items():
                start = time.perf_counter()
                for picture in pictures:
                    way(picture)
                times[name].append((time.perf_counter() - start) / len(pictures) * 1000)
        row = dict(size=f'{width}x{height}', **{f'{name}_ms': round(min(t[1:]), 3) for name, t in times.items()})
        row['fast_speedup'] = round(row['clip_retrieval_ms'] / row['fast_ms'], 2)
        rows.append(row)
    return dict(rows=rows)


def _shards(folder: Path, width: int, height: int, count: int, per_shard: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(count // per_shard):
        path = folder / f'{width}x{height}-{s:03d}.tar'
        with tarfile.open(path, 'w') as tf:
            for i in range(per_shard):
                data = _photo(width, height, s * per_shard + i)
                info = tarfile.TarInfo(f'{s:03d}{i:05d}.jpg')
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _tiny_224(folder: Path) -> tuple[Path, Path]:
    """The tiny reference architecture at 224 px in 32-px patches (49 tokens: encoding costs a fraction of decoding,
    so the pipeline is decode-bound), its config and a checkpoint of its own weights."""
    import open_clip

    import eva_open_clip
    from support.checkpoints import golden
    config = dict(golden('tiny_a')['config'])
    config['vision_cfg'] = dict(config['vision_cfg'], image_size=224, patch_size=32)
    (folder / 'tiny224.json').write_text(json.dumps(config))
    eva_open_clip.register_eva_model('tiny224', config)
    torch.save(open_clip.create_model('tiny224').state_dict(), folder / 'tiny224.pt')
    return folder / 'tiny224.json', folder / 'tiny224.pt'


CLIP_RETRIEVAL = '''
import io, json, sys, time, torch, webdataset as wds, open_clip, eva_open_clip
from PIL import Image
eva_open_clip.register_eva_model('tiny224', json.load(open(sys.argv[1])))
model, _, preprocess = open_clip.create_model_and_transforms('tiny224', pretrained=sys.argv[2])
model.eval()
dataset = wds.WebDataset(sys.argv[3:], shardshuffle=False).map(
    lambda s: dict(image_tensor=preprocess(Image.open(io.BytesIO(s['jpg']))), key=s['__key__']))
loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=1, prefetch_factor=2)
rows, start = 0, None
with torch.no_grad():
    for item in loader:
        batch = item['image_tensor']
        model.encode_image(batch, normalize=True)
        if start is None:
            start = time.perf_counter()
        else:
            rows += len(batch)
print(json.dumps(dict(images_per_s=rows / (time.perf_counter() - start))))
'''


def end_to_end() -> dict:
    rows = []
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        config, checkpoint = _tiny_224(work)
        import open_clip
        model = open_clip.create_model('tiny224').eval()
        threads = torch.get_num_threads()
        torch.set_num_threads(max(1, threads - 1))  # what embed's main process keeps beside one worker
        with torch.no_grad():
            x = torch.randn(64, 3, 224, 224)
            encode_only = _rate(lambda: model.encode_image(x, normalize=True), 64, seconds=3.0)
        torch.set_num_threads(threads)
        for width, height, count in ((500, 375, 1536), (1600, 1200, 512)):
            shards = _shards(work / f'{width}', width, height, count, count // 4)
            run = _run([sys.executable, '-c', CLIP_RETRIEVAL, str(config), str(checkpoint), *map(str, shards)])
            theirs = json.loads(run.strip().splitlines()[-1])['images_per_s']
            out = work / f'out-{width}'
            _run([sys.executable, '-m', 'eva_open_clip', 'run', '--register', f'tiny224={config}', '-m',
                  'eva_open_clip', 'embed', *map(str, shards), '--out', str(out), '--model', 'tiny224',
                  '--pretrained', str(checkpoint), '--decode', 'fast', '--workers', '1', '--batch-size', '64',
                  '--quiet'])
            ours = json.loads((out / 'summary.json').read_text())['ranks'][0]['images_per_s']
            rows.append(dict(size=f'{width}x{height}', images=count, clip_retrieval_images_per_s=round(theirs, 1),
                             embed_fast_images_per_s=round(ours, 1), ratio=round(ours / theirs, 2)))
    return dict(model='tiny224', encode_only_images_per_s=round(encode_only, 1), rows=rows)


def _run(command: list[str]) -> str:
    """Run a command; its stdout, or a RuntimeError carrying the end of its stderr."""
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        raise RuntimeError(f'exit {run.returncode}: {run.stderr.strip()[-1500:]}')
    return run.stdout


def fidelity() -> dict:
    import open_clip

    from eva_open_clip.runtime.pixels import Pixels
    from support.checkpoints import full_size_checkpoint, manifest, synthetic_checkpoint
    name = 'EVA02-CLIP-B-16'
    shapes = manifest(name)
    sd = full_size_checkpoint(name)
    sd.update(synthetic_checkpoint({k: s for k, s in shapes.items() if '.rope.' not in k}))
    with tempfile.TemporaryDirectory() as work:
        torch.save(sd, Path(work) / 'b16.pt')
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(Path(work) / 'b16.pt'))
    model.eval()
    exact, fast = Pixels(preprocess, 'exact'), Pixels(preprocess, 'fast')
    rows = []
    for width, height in SIZES:
        pictures = [_photo(width, height, 1000 + seed) for seed in range(16)]
        with torch.no_grad():
            a = model.encode_image(exact.to_model(torch.stack([exact.prepare(p) for p in pictures]), torch.float32),
                                   normalize=True)
            b = model.encode_image(exact.to_model(torch.stack([fast.prepare(p) for p in pictures]), torch.float32),
                                   normalize=True)
        cosines = (a * b).sum(-1)
        spread = float((a @ a.T).fill_diagonal_(0).abs().max())
        rows.append(dict(size=f'{width}x{height}', least_cosine=round(float(cosines.min()), 6),
                         mean_cosine=round(float(cosines.mean()), 6), largest_cosine_between_pictures=round(spread, 3)))
    return dict(model=name, rows=rows)


def _compile_rate(model, batch: int, size: int) -> tuple[float, float, float]:
    x = torch.randn(batch, 3, size, size)
    with torch.no_grad():
        eager = _rate(lambda: model.encode_image(x, normalize=True), batch)
        start = time.perf_counter()
        compiled = torch.compile(model.encode_image, fullgraph=True, dynamic=False)
        compiled(x, normalize=True)
        compile_s = time.perf_counter() - start
        return eager, _rate(lambda: compiled(x, normalize=True), batch), compile_s


def _rate(work, batch: int, seconds: float = 5.0) -> float:
    work()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 3:
        began = time.perf_counter()
        work()
        times.append(time.perf_counter() - began)
    return batch / statistics.median(times)


def compile_section() -> dict:
    import open_clip
    rows = []
    with tempfile.TemporaryDirectory() as work:
        _tiny_224(Path(work))
        for name in ('tiny224', 'EVA02-CLIP-B-16'):
            model = open_clip.create_model(name).eval()
            eager, compiled, seconds = _compile_rate(model, 8, 224)
            rows.append(dict(model=name, batch=8, eager_images_per_s=round(eager, 2),
                             compiled_images_per_s=round(compiled, 2), speedup=round(compiled / eager, 2),
                             compile_seconds=round(seconds, 1)))
    return dict(threads=torch.get_num_threads(), rows=rows)


SECTIONS = {'per_core': per_core, 'end_to_end': end_to_end, 'fidelity': fidelity, 'compile': compile_section}


def main() -> None:
    run_sections(__doc__, SECTIONS, __file__)


if __name__ == '__main__':
    main()
