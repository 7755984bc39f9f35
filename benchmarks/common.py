"""What the benchmarks share: the device's GEMM peak, the child-process runner, a command line of sections, and
encode-only timing.

Each benchmark measures in fresh child processes (so that one measurement's memory and threads never
colour the next) that print one JSON line last; `child` runs one and reads it.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch


def sync(device: str) -> None:
    if device.startswith('cuda'):
        torch.cuda.synchronize()


def gemm_peak(dtype: torch.dtype, device: str, n: int | None = None) -> float:
    """Best FLOP/s of an n x n matmul in `dtype` (n: 8192 on a GPU, 4096 on the CPU): the machine's GEMM limit."""
    gpu = device.startswith('cuda')
    n = n or (8192 if gpu else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    repeats, rounds = (10, 5) if gpu else (1, 3)
    best = float('inf')
    for _ in range(rounds):
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n ** 3 / best  # a multiply and an add per term


def child(script: str | Path, *args: str, check: bool = True) -> dict:
    """`python SCRIPT --child ARGS` in a fresh process: the JSON object on its last line of output.

    A failed child stops the benchmark (`check`), or gives {'error', 'returncode', 'args'}."""
    out = subprocess.run([sys.executable, str(script), '--child', *args], capture_output=True, text=True)
    if out.returncode:
        if check:
            raise SystemExit(f'child {args} failed:\n{out.stderr[-4000:]}')
        return dict(error=(out.stderr.strip().splitlines() or ['killed'])[-1], returncode=out.returncode, args=args)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_sections(doc: str, sections: dict[str, Callable[[], dict]], script: str) -> None:
    """The command line of a benchmark made of `sections`: each (or each `--section` named) runs in a fresh
    process of `script` and prints one JSON line as it ends, an error line if it fails."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--section', action='append', choices=list(sections), help='(default: every section)')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(dict(section=args.child, **sections[args.child]())), flush=True)
        return
    for section in args.section or list(sections):
        out = subprocess.run([sys.executable, script, '--child', section], capture_output=True, text=True)
        line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 else \
            json.dumps(dict(section=section, error=(out.stderr.strip().splitlines() or ['killed'])[-1]))
        print(line, flush=True)


def encode_only(name: str, checkpoint: Path, batch: int, device: str = 'cpu', precision: str = 'fp32',
                batches: int = 20, min_seconds: float = 0.0, config: Path | None = None,
                warmup_rows: int | None = None) -> dict:
    """The command line's own encoder (`embed`'s model, precision and batch) on ready tensors, in a fresh
    process: after one warm-up batch (of `warmup_rows` rows if given: a slow model's warm-up on one image),
    at least `batches` batches and `min_seconds`. `config`: a custom
    model's EVA-CLIP config to register first. Returns the timed images, seconds and images/s."""
    code = f'''
import time, torch, eva_open_clip
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.encoder import load_encoder
if {str(config)!r} != 'None':
    eva_open_clip.register_eva_model({name!r}, {str(config)!r})
encoder = load_encoder(ModelChoice.checked({name!r}, {str(checkpoint)!r}, {device!r}, {precision!r}))
model = encoder.model
size = model.visual.preprocess_cfg['size']
size = size[0] if isinstance(size, (tuple, list)) else size
x = torch.randn({batch}, 3, size, size)
encoder.encode_pixels(x[:{warmup_rows or batch}])
n, start = 0, time.perf_counter()
while n < {batches * batch} or time.perf_counter() - start < {min_seconds}:
    encoder.encode_pixels(x)
    n += {batch}
print(n, time.perf_counter() - start)
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    images, seconds = out.stdout.strip().splitlines()[-1].split()
    return dict(timed_rows=int(images), seconds=float(seconds), images_per_s=int(images) / float(seconds))
