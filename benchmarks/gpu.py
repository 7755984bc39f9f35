"""The GPU benchmark, in one call that prints one JSON object.

    python benchmarks/gpu.py              # on a machine with a GPU (a few minutes; about 40 GB of disk)
    python benchmarks/gpu.py --dry-run    # on the CPU with the tiny reference model (tests run this)

Sections (each also reports its own wall time):

- `gemm`: the bf16 matrix-multiply peak of this GPU, measured here (the yardstick of `encode`).
- `encode`: EVA_CLIP_g_14 `encode_image` in bf16 at batch 64 and 256, eager and `torch.compile`:
  images/s and the fraction of the measured peak that its FLOPs (counted by torch's FlopCounterMode)
  reach.
- `embed`: `eva-open-clip embed` end to end over generated JPEG shards with decoding workers, against
  encode-only of the same model, precision and batch size on ready tensors (target: >= 0.9 for g/14);
  for EVA02-CLIP-L-14 (a smaller model, where decoding is the bottleneck) also images/s per worker.
- `load`: loading straight to the GPU (`create_model_and_transforms(..., device='cuda')`, each tensor
  created on the GPU from the read-only mapped file) for EVA_CLIP_g_14 from an fp16 file and
  EVA-CLIP-8B from an fp32 file, both to bf16: seconds, peak GPU memory against the model's bytes, peak
  host RSS. The files are generated in the released layout (every key and shape of the manifests) and
  removed afterwards; each load runs in a fresh process (`bench_large_load.child_load`).

With --dry-run every section runs on the CPU with the tiny reference architecture (tests/data/tiny_a),
so the script is exercised by the test suite and does not rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large_load import DTYPES, manifest, write_checkpoint  # noqa: E402
from common import encode_only, gemm_peak, sync  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / 'tests' / 'data' / 'tiny_a'
LOAD_CASES = [('EVA_CLIP_g_14', 'fp16', 'bf16'), ('EVA-CLIP-8B', 'fp32', 'bf16')]
BF16_FLOP = 2  # multiply and add


def gemm_section(dry_run: bool) -> dict:
    """The bf16 GEMM rate (FLOP/s) of the device: the best of a few large square products."""
    device, n = ('cpu', 512) if dry_run else ('cuda', 8192)
    return dict(n=n, flop_per_s=gemm_peak(torch.bfloat16, device, n))


def _model(name: str, device: str, config: Path | None):
    import open_clip

    import eva_open_clip
    if config:
        eva_open_clip.register_eva_model(name, json.loads(config.read_text()))
    return open_clip.create_model(name, precision='bf16', device=device).eval()


def encode_section(name: str, batches: list[int], peak: float, dry_run: bool, config: Path | None) -> list[dict]:
    """images/s of encode_image in bf16, eager and compiled, and the share of the GEMM peak reached."""
    from torch.utils.flop_counter import FlopCounterMode
    device = 'cpu' if dry_run else 'cuda'
    model = _model(name, device, config)
    size = model.visual.preprocess_cfg['size']
    size = size[0] if isinstance(size, (tuple, list)) else size
    runs = []
    for compiled in (False, True):
        # the dry run compiles with the 'eager' backend: the code path, without a C++ toolchain's minutes
        encode = torch.compile(model.encode_image, backend='eager' if dry_run else 'inductor') if compiled \
            else model.encode_image
        for batch in batches:
            x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)
            with torch.no_grad():
                with FlopCounterMode(display=False) as counter:
                    model.encode_image(x[:1])
                flops = counter.get_total_flops()
                for _ in range(3):  # warm-up (and compilation)
                    encode(x)
                sync(device)
                start, n = time.perf_counter(), 0
                while n < 5 or time.perf_counter() - start < (0.5 if dry_run else 5):
                    encode(x)
                    n += 1
                sync(device)
            rate = n * batch / (time.perf_counter() - start)
            runs.append(dict(model=name, batch=batch, compiled=compiled, images_per_s=rate,
                             flop_per_image=flops, peak_fraction=rate * flops / peak))
    return runs


def embed_section(name: str, checkpoint: Path, shards: str, batch: int, workers: int, device: str,
                  config: Path | None, workdir: Path) -> dict:
    """`eva-open-clip embed` end to end (rate after the first batch) against encode-only of the same model."""
    out = workdir / f'embed-{name}'
    register = ['run', '--register', f'{name}={config}', '-m', 'eva_open_clip'] if config else []
    cmd = [sys.executable, '-m', 'eva_open_clip', *register, 'embed', shards, '--out', str(out), '--model', name,
           '--pretrained', str(checkpoint), '--precision', 'bf16', '--device', device, '--batch-size', str(batch),
           '--workers', str(workers), '--quiet']
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    rank = json.loads((out / 'summary.json').read_text())['ranks'][0]
    shutil.rmtree(out)
    ceiling = encode_only(name, checkpoint, batch, device, 'bf16', min_seconds=5, config=config)['images_per_s']
    return dict(model=name, batch=batch, workers=workers, images_per_s=rank['images_per_s'],
                encode_only_images_per_s=ceiling, ratio=rank['images_per_s'] / ceiling,
                images_per_s_per_worker=rank['images_per_s'] / workers,
                input_wait_fraction=rank['input_wait_s'] / rank['seconds'])


def _tiny(workdir: Path) -> tuple[Path, dict[str, list[int]]]:
    """The tiny reference architecture's config file, and its checkpoint's keys and shapes."""
    config = workdir / 'tiny.json'
    config.write_text(json.dumps(torch.load(TINY / 'golden.pt', weights_only=True)['config']))
    packed = torch.load(TINY / 'checkpoint_packed.pt', weights_only=True)
    shapes = {k: list(v.shape) for k, v in packed['tensors'].items()}
    shapes['text.token_embedding.weight'] = list(packed['embedding_shape'])
    return config, {k: shapes[k] for k in packed['keys'] if '.rope.' not in k}


def _load(name: str, precision: str, checkpoint: Path, device: str, config: Path | None) -> dict:
    args = [name, precision, str(checkpoint), device, '1'] + ([str(config)] if config else [])
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_large_load.py'), '--child', *args],
                         capture_output=True, text=True)
    if out.returncode:
        return dict(model=name, error=(out.stderr.strip().splitlines() or ['killed'])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_section(workdir: Path, dry_run: bool) -> list[dict]:
    """Load each case's generated file straight to the device, in a fresh process each."""
    device = 'cpu' if dry_run else 'cuda'
    cases = [('tiny', 'fp32', 'bf16')] if dry_run else LOAD_CASES
    config, tiny_shapes = _tiny(workdir) if dry_run else (None, None)
    runs = []
    for name, file_dtype, precision in cases:
        checkpoint = workdir / f'{name}.{file_dtype}.pt'
        start = time.perf_counter()
        size = write_checkpoint(checkpoint, tiny_shapes if dry_run else manifest(name), DTYPES[file_dtype])
        written = time.perf_counter() - start
        run = _load(name, precision, checkpoint, device, config)
        checkpoint.unlink()
        runs.append(dict(run, file_dtype=file_dtype, file_bytes=size, write_s=written))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='the tiny model on the CPU')
    parser.add_argument('--workdir', help='where generated files go (default: a temporary folder)')
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('gpu.py: no CUDA device here; use --dry-run to exercise it on the CPU')
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='eva-gpu-bench-'))
    workdir.mkdir(parents=True, exist_ok=True)
    device = 'cpu (dry run)' if args.dry_run else torch.cuda.get_device_name()
    result: dict = dict(device=device, torch=torch.__version__, seconds={})

    def timed(section: str, work):
        start = time.perf_counter()
        result[section] = work()
        result['seconds'][section] = time.perf_counter() - start

    config, tiny_shapes = _tiny(workdir) if args.dry_run else (None, None)
    timed('gemm', lambda: gemm_section(args.dry_run))
    peak = result['gemm']['flop_per_s']
    g14 = 'tiny' if args.dry_run else 'EVA_CLIP_g_14'
    timed('encode', lambda: encode_section(g14, [2, 4] if args.dry_run else [64, 256], peak, args.dry_run, config))
    timed('embed', lambda: _embeds(workdir, args.dry_run, config, tiny_shapes))
    timed('load', lambda: load_section(workdir, args.dry_run))
    print(json.dumps(result))


def _embeds(workdir: Path, dry_run: bool, config: Path | None, tiny_shapes: dict | None) -> list[dict]:
    """The embed figures of g/14 (model-bound) and L-14 (decode-bound), on generated JPEG shards."""
    from bench_embed import make_shards
    folder = workdir / 'shards'
    folder.mkdir(exist_ok=True)
    workers = min(16, os.cpu_count() or 1)
    shards = make_shards(folder, 200 if dry_run else 12_000, per_shard=50 if dry_run else 500)
    device = 'cpu' if dry_run else 'cuda'
    runs = []
    for name, batch in ([('tiny', 16)] if dry_run else [('EVA_CLIP_g_14', 256), ('EVA02-CLIP-L-14', 256)]):
        checkpoint = workdir / f'{name}.pt'
        if dry_run:
            write_checkpoint(checkpoint, tiny_shapes, torch.float32)
        elif name == 'EVA_CLIP_g_14':
            write_checkpoint(checkpoint, manifest(name), torch.float16)
        else:  # no manifest: the registered architecture's own (open_clip-layout) weights, random
            torch.save(_model(name, 'cpu', None).state_dict(), checkpoint)
        runs.append(embed_section(name, checkpoint, shards, batch, 2 if dry_run else workers, device, config, workdir))
        checkpoint.unlink()
    shutil.rmtree(folder)
    return runs


if __name__ == '__main__':
    main()
