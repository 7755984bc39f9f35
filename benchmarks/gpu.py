"""The GPU benchmark, in one call of at most ten minutes on one GPU, each section printed (one JSON line) as soon
as it finishes, so that a run cut short keeps what it measured.

    python benchmarks/gpu.py                          # every section that fits the time budget (default 540 s)
    python benchmarks/gpu.py --section encode         # one section (repeatable)
    python benchmarks/gpu.py --dry-run                # on the CPU with the tiny reference model (the tests run it)

Sections, in the order they run (a section that would not fit what is left of the budget is skipped, saying
so):

- `gemm`: the GPU's matrix-multiply peaks, bf16 and fp32 with TF32: the yardsticks of `encode`.
- `encode`: encode_image of EVA02-CLIP-B-16, EVA02-CLIP-L-14 and EVA_CLIP_g_14, eager, at batch 64 and 256
  (`embed`'s default on a GPU), in bf16 and in fp32 with TF32, on inputs already on the GPU: images/s, the
  fraction of the matching peak its FLOPs reach (counted by FlopCounterMode), peak GPU memory.
- `embed`: `eva-open-clip embed` end to end with its GPU defaults (bf16, batch 256, `--decode fast`) and with
  `--decode exact`, on generated shards of web-sized JPEGs, for g/14 and L-14: images/s after the first batch
  against encode-only of the same model on GPU-resident inputs, and the share of the time the GPU waited for
  decoded batches (goal: >= 0.9 of encode-only).
- `decode`: per picture and core, clip-retrieval's preprocessing against `--decode exact` and `fast`.
- `large`: EVA-CLIP-8B and EVA-CLIP-18B loaded straight onto the GPU from generated files in the released
  layout (8B fp32, 18B fp16), in bf16 and with int8 linear layers: load seconds, peak GPU memory, images/s at
  batch 64.
- `compile`: encode_image compiled (`torch.compile`, fullgraph) for B-16, L-14 and g/14 at batch 256 in bf16
  (and B-16 in fp32 with TF32): images/s, fraction of the peak, compile seconds, peak GPU memory.

Generated files go to `--workdir` (a temporary folder by default) and are removed as soon as they have served.
"""
from __future__ import annotations

import argparse
import importlib.util
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
from common import gemm_peak, sync  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / 'tests' / 'data' / 'tiny_a'
ENCODE_MODELS = ['EVA02-CLIP-B-16', 'EVA02-CLIP-L-14', 'EVA_CLIP_g_14']
# seconds each section takes on an H200, from which the budget decides what still fits
COSTS = {'gemm': 15, 'encode': 90, 'embed': 180, 'decode': 30, 'large': 240, 'compile': 300}


class Bench:
    """What every section needs: the device, the dry run's tiny model, the workdir, the clock."""

    def __init__(self, dry_run: bool, workdir: Path, budget_s: float):
        self.dry_run, self.workdir, self.budget_s = dry_run, workdir, budget_s
        self.device = 'cpu' if dry_run else 'cuda'
        self.started = time.perf_counter()
        self.peaks: dict[str, float] = {}
        if dry_run:
            self.config = workdir / 'tiny.json'
            self.config.write_text(json.dumps(torch.load(TINY / 'golden.pt', weights_only=True)['config']))

    def left_s(self) -> float:
        return self.budget_s - (time.perf_counter() - self.started)

    def model_names(self, names: list[str]) -> list[str]:
        return ['tiny'] if self.dry_run else names

    def model(self, name: str, precision: str, **kwargs):
        import open_clip

        import eva_open_clip
        if self.dry_run:
            eva_open_clip.register_eva_model('tiny', json.loads(self.config.read_text()))
        return open_clip.create_model(name, precision=precision, device=self.device, **kwargs).eval()

    def memory_reset(self) -> None:
        if not self.dry_run:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        return None if self.dry_run else torch.cuda.max_memory_allocated()


def gemm(bench: Bench) -> dict:
    n = 512 if bench.dry_run else 8192
    bf16 = gemm_peak(torch.bfloat16, bench.device, n)
    if not bench.dry_run:
        torch.backends.cuda.matmul.allow_tf32 = True
    tf32 = gemm_peak(torch.float32, bench.device, n)
    bench.peaks = {'bf16': bf16, 'fp32': tf32}
    return dict(n=n, bf16_flop_per_s=bf16, fp32_tf32_flop_per_s=tf32)


def _image_size(model) -> int:
    size = model.visual.preprocess_cfg['size']
    return size[0] if isinstance(size, (tuple, list)) else size


def _flops(model, size: int, dtype: torch.dtype, device: str) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.encode_image(torch.randn(1, 3, size, size, device=device, dtype=dtype))
    return counter.get_total_flops()


def _rate(encode, x: torch.Tensor, device: str, seconds: float) -> float:
    with torch.no_grad():
        for _ in range(3):  # warm-up (and compilation)
            encode(x)
        sync(device)
        start, n = time.perf_counter(), 0
        while n < 3 or time.perf_counter() - start < seconds:
            encode(x)
            n += 1
        sync(device)
    return n * len(x) / (time.perf_counter() - start)


def _encode_runs(bench: Bench, names: list[str], batches: list[int], precisions: list[str],
                 compiled: bool) -> list[dict]:
    runs = []
    for name in bench.model_names(names):
        for precision in precisions:
            if bench.left_s() < 20:
                runs.append(dict(model=name, precision=precision, skipped='time budget'))
                continue
            dtype = torch.bfloat16 if precision == 'bf16' else torch.float32
            model = bench.model(name, precision)
            size = _image_size(model)
            flops = _flops(model, size, dtype, bench.device)
            started = time.perf_counter()
            encode = torch.compile(model.encode_image, fullgraph=True, dynamic=False,
                                   backend='eager' if bench.dry_run else 'inductor') if compiled else model.encode_image
            for batch in batches:
                bench.memory_reset()
                x = torch.randn(batch, 3, size, size, device=bench.device, dtype=dtype)
                began = time.perf_counter()
                rate = _rate(encode, x, bench.device, 0.5 if bench.dry_run else 4)
                peak = bench.peaks[precision]
                runs.append(dict(model=name, precision=precision if precision == 'bf16' else 'fp32 (tf32)',
                                 batch=batch, compiled=compiled, images_per_s=rate, flop_per_image=flops,
                                 peak_fraction=rate * flops / peak, peak_gpu_memory=bench.peak_memory(),
                                 **({'compile_and_run_s': time.perf_counter() - started} if compiled else {}),
                                 seconds=time.perf_counter() - began))
            del model, encode
    return runs


def encode(bench: Bench) -> dict:
    batches = [2, 4] if bench.dry_run else [64, 256]
    return dict(default_batch=256, runs=_encode_runs(bench, ENCODE_MODELS, batches, ['bf16', 'fp32'], False))


def compile_section(bench: Bench) -> dict:
    batch = [4] if bench.dry_run else [256]
    runs = _encode_runs(bench, ENCODE_MODELS, batch, ['bf16'], True)
    runs += _encode_runs(bench, ENCODE_MODELS[:1], batch, ['fp32'], True)
    return dict(runs=runs)


def _checkpoint(bench: Bench, name: str) -> Path:
    """A checkpoint of `name` in the released layout (its manifest; the registered model's own weights where the
    tests keep no manifest), random values."""
    path = bench.workdir / f'{name}.pt'
    if bench.dry_run:
        packed = torch.load(TINY / 'checkpoint_packed.pt', weights_only=True)
        shapes = {k: list(v.shape) for k, v in packed['tensors'].items()}
        shapes['text.token_embedding.weight'] = list(packed['embedding_shape'])
        write_checkpoint(path, {k: shapes[k] for k in packed['keys']}, torch.float32)
    elif name == 'EVA_CLIP_g_14':
        write_checkpoint(path, manifest(name), torch.float16)
    else:
        torch.save(bench.model(name, 'fp32').state_dict(), path)
    return path


def _embed(bench: Bench, name: str, checkpoint: Path, shards: str, decode: str) -> dict:
    out = bench.workdir / f'embed-{name}-{decode}'
    register = ['run', '--register', f'tiny={bench.config}', '-m', 'eva_open_clip'] if bench.dry_run else []
    cmd = [sys.executable, '-m', 'eva_open_clip', *register, 'embed', shards, '--out', str(out), '--model', name,
           '--pretrained', str(checkpoint), '--decode', decode, '--quiet']
    if bench.dry_run:
        cmd += ['--device', 'cpu', '--batch-size', '16', '--workers', '2']
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    rank = json.loads((out / 'summary.json').read_text())['ranks'][0]
    shutil.rmtree(out)
    return dict(images_per_s=rank['images_per_s'], gpu_wait_fraction=rank['input_wait_s'] / rank['seconds'])


def embed(bench: Bench) -> dict:
    from bench_embed import make_shards
    folder = bench.workdir / 'shards'
    folder.mkdir(exist_ok=True)
    shards = make_shards(folder, 200 if bench.dry_run else 8_000, per_shard=50 if bench.dry_run else 250)
    runs = []
    for name in bench.model_names(['EVA_CLIP_g_14', 'EVA02-CLIP-L-14']):
        if bench.left_s() < 60:
            runs.append(dict(model=name, skipped='time budget'))
            continue
        checkpoint = _checkpoint(bench, name)
        model = bench.model(name, 'bf16')
        x = torch.randn(16 if bench.dry_run else 256, 3, _image_size(model), _image_size(model), device=bench.device,
                        dtype=torch.bfloat16)
        ceiling = _rate(model.encode_image, x, bench.device, 0.5 if bench.dry_run else 5)
        del model
        row = dict(model=name, encode_only_images_per_s=ceiling)
        for decode in ('fast', 'exact'):
            measured = _embed(bench, name, checkpoint, shards, decode)
            row[decode] = dict(measured, ratio=measured['images_per_s'] / ceiling)
        runs.append(row)
        checkpoint.unlink()
    shutil.rmtree(folder)
    return dict(runs=runs, cores=os.cpu_count())


def decode(bench: Bench) -> dict:
    from bench_decode import per_core
    return per_core()


LARGE = [('EVA-CLIP-8B', 'fp32'), ('EVA-CLIP-18B', 'fp16')]


def _load_child(name: str, checkpoint: str, device: str, quantize: str, config: str) -> dict:
    code = f'''
import json, time, torch, open_clip, eva_open_clip
if {config!r}:
    eva_open_clip.register_eva_model({name!r}, json.load(open({config!r})))
cuda = {device!r} == 'cuda'
start = time.perf_counter()
model = open_clip.create_model({name!r}, pretrained={checkpoint!r}, precision='bf16', device={device!r},
                               **({{'quantize': {quantize!r}}} if {quantize!r} != 'none' else {{}})).eval()
if cuda:
    torch.cuda.synchronize()
seconds = time.perf_counter() - start
peak_load = torch.cuda.max_memory_allocated() if cuda else None
size = model.visual.preprocess_cfg['size']
size = size[0] if isinstance(size, (tuple, list)) else size
x = torch.randn({4 if device == 'cpu' else 64}, 3, size, size, device={device!r}, dtype=torch.bfloat16)
with torch.no_grad():
    model.encode_image(x)
    if cuda:
        torch.cuda.synchronize()
    start, n = time.perf_counter(), 0
    while n < 3:
        model.encode_image(x)
        n += 1
    if cuda:
        torch.cuda.synchronize()
rate = n * len(x) / (time.perf_counter() - start)
print(json.dumps(dict(load_seconds=seconds, peak_gpu_memory_loading=peak_load,
                      peak_gpu_memory=torch.cuda.max_memory_allocated() if cuda else None, images_per_s=rate)))
'''
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ['killed'])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def large(bench: Bench) -> dict:
    from eva_open_clip.quantize import TORCH
    from eva_open_clip.versions import TORCH as INSTALLED
    from eva_open_clip.versions import at_least
    int8 = at_least(INSTALLED, TORCH) and importlib.util.find_spec('torchao') is not None
    runs = []
    for name, file_dtype in ([('tiny', 'fp32')] if bench.dry_run else LARGE):
        if bench.left_s() < 90:
            runs.append(dict(model=name, skipped='time budget'))
            continue
        checkpoint = bench.workdir / f'{name}.{file_dtype}.pt'
        start = time.perf_counter()
        if bench.dry_run:
            checkpoint = _checkpoint(bench, name)
        else:
            write_checkpoint(checkpoint, manifest(name), DTYPES[file_dtype])
        written = time.perf_counter() - start
        for quantize in ('none', 'int8') if int8 else ('none',):
            row = _load_child(name, str(checkpoint), bench.device, quantize, str(bench.config) if bench.dry_run else '')
            runs.append(dict(row, model=name, file_dtype=file_dtype, precision='bf16', quantize=quantize,
                             write_seconds=written))
        checkpoint.unlink()
    return dict(runs=runs)


SECTIONS = {'gemm': gemm, 'encode': encode, 'embed': embed, 'decode': decode, 'large': large,
            'compile': compile_section}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='the tiny model on the CPU')
    parser.add_argument('--section', action='append', choices=list(SECTIONS), help='(default: every section)')
    parser.add_argument('--budget-s', type=float, default=540, help='seconds this call may take (default: %(default)s)')
    parser.add_argument('--workdir', help='where generated files go (default: a temporary folder)')
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('gpu.py: no CUDA device here; use --dry-run to exercise it on the CPU')
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='eva-gpu-bench-'))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.dry_run, workdir, args.budget_s)
    device = 'cpu (dry run)' if args.dry_run else torch.cuda.get_device_name()
    print(json.dumps(dict(section='machine', device=device, torch=torch.__version__, cores=os.cpu_count(),
                          budget_s=args.budget_s)), flush=True)
    wanted = args.section or list(SECTIONS)
    if 'gemm' not in wanted and {'encode', 'compile'} & set(wanted):
        wanted = ['gemm'] + wanted  # the yardstick of the fractions
    for name in wanted:
        start = time.perf_counter()
        if not args.dry_run and bench.left_s() < COSTS[name]:
            result = dict(skipped=f'time budget: {bench.left_s():.0f} s left, it takes about {COSTS[name]} s')
        else:
            try:
                result = SECTIONS[name](bench)
            except Exception as e:  # a section that fails is said, and the next one runs
                result = dict(error=f'{type(e).__name__}: {str(e)[-1500:]}')
        print(json.dumps(dict(section=name, seconds=time.perf_counter() - start, **result)), flush=True)
    print(json.dumps(dict(section='done', seconds=time.perf_counter() - bench.started)), flush=True)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
