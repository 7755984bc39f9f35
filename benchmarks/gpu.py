"""The GPU benchmark, in one call of at most ten minutes on one GPU: one JSON line per measurement as soon as it is
made, so that a call cut short or a section that crashes keeps everything measured before.

    python benchmarks/gpu.py                          # the `core` set (fits one call: about 350 s on an H100)
    python benchmarks/gpu.py --sections large         # another set, in its own call
    python benchmarks/gpu.py --section encode         # single sections (repeatable)
    python benchmarks/gpu.py --dry-run                # every section on the CPU with the tiny model (the tests run it)

Sets, each sized to fit one call's budget (default 540 s; a section that would not fit what is left is
skipped, saying so):

- `core`: `tests`, `gemm`, `encode`, `decode`, `embed`.
- `large`: `large`.
- `compile`: `gemm`, `compile`.
- `train`: `train`.

Sections:

- `tests`: the `gpu`-marked tests (`pytest -m gpu`: no synchronizing call in a launch, features on a second GPU,
  pinned buffers reused, TF32 scoped, `embed` with the GPU's defaults against open_clip), first.
- `gemm`: the GPU's matrix-multiply peaks, bf16 and fp32 with TF32, as measured (cuBLAS, 8192^3) and as
  specified for the card (dense tensor-core TFLOP/s, e.g. 989 bf16 on H100 and H200): the yardsticks of
  `encode` and `compile`.
- `encode`: encode_image of EVA02-CLIP-B-16, EVA02-CLIP-L-14 and EVA_CLIP_g_14, eager, at batch 64 and 256
  (`embed`'s default on a GPU), in bf16 and in fp32 with TF32, on inputs already on the GPU: images/s, the
  fraction of each peak its FLOPs reach (counted by FlopCounterMode), peak GPU memory.
- `embed`: `eva-open-clip embed` end to end with its GPU defaults (bf16, batch 256, `--decode fast`) and with
  `--decode exact`, on generated shards of web-sized JPEGs (whole batches of 256, at least 40 of them timed),
  for g/14 and L-14: images/s after the first batch against encode-only of the same model on GPU-resident
  inputs, and the share of the time the GPU waited for decoded batches (goal: >= 0.9 of encode-only).
- `decode`: per picture and core, clip-retrieval's preprocessing against `--decode exact` and `fast`.
- `large`: EVA-CLIP-8B and EVA-CLIP-18B loaded straight onto the GPU from generated files in the released
  layout (8B fp32, 18B fp16), in bf16 and with int8 linear layers: load seconds, peak GPU memory, images/s at
  batch 64 (a file is written only where the disk has room for it).
- `compile`: encode_image compiled (`torch.compile`, fullgraph) for B-16, L-14 and g/14 at batch 256 in bf16
  (and B-16 in fp32 with TF32): images/s, fractions of the peaks, compile seconds, peak GPU memory.

- `train`: `eva-open-clip train` of EVA02-CLIP-B-16 and EVA_CLIP_g_14 with its GPU defaults (bf16 autocast),
  full fine-tuning and LoRA (rank 8), on generated shards: samples/s after the first steps, peak GPU memory.

Children (`embed`, `large`, `train`, the tests) run with a timeout from what is left of the budget, after this process
has given its cached GPU memory back. Generated files go to `--workdir` (a temporary folder by default) and are
removed as soon as they have served.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
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
# seconds each section takes on an H100 or H200, from which the budget decides what still fits
COSTS = {'tests': 40, 'gemm': 15, 'encode': 90, 'decode': 30, 'embed': 170, 'large': 240, 'compile': 300,
         'train': 260, 'giant': 330}
SETS = {'core': ['tests', 'gemm', 'encode', 'decode', 'embed'], 'large': ['large'], 'compile': ['gemm', 'compile'],
        'train': ['train'], 'giant': ['giant']}
# dense tensor-core peaks as specified (FLOP/s): bf16, and fp32 on TF32
SPEC_PEAKS = {'H200': (989e12, 494.5e12), 'H100': (989e12, 494.5e12), 'A100': (312e12, 156e12),
              'L40S': (362e12, 183e12), 'A10': (125e12, 62.5e12), 'L4': (121e12, 60e12)}
EMBED_BATCH = 256  # embed's default on a GPU
EMBED_SHARDS, EMBED_PER_SHARD = 12, 4 * EMBED_BATCH  # 48 whole batches, 12 shards in one wave of workers


def emit(section: str, **record) -> None:
    """One JSON line, at once."""
    print(json.dumps(dict(section=section, **record)), flush=True)


def spec_peaks(device_name: str) -> tuple[float, float] | None:
    return next((peaks for card, peaks in SPEC_PEAKS.items() if card in device_name), None)


class Bench:
    """What every section needs: the device, the dry run's tiny model, the workdir, the clock."""

    def __init__(self, dry_run: bool, workdir: Path, budget_s: float):
        self.dry_run, self.workdir, self.budget_s = dry_run, workdir, budget_s
        self.device = 'cpu' if dry_run else 'cuda'
        self.started = time.perf_counter()
        self.peaks: dict[str, float] = {}
        self.spec: tuple[float, float] | None = None
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

    def child_timeout(self) -> float:
        """A child's limit: what is left of the budget (at least a minute, so that a short one can say why)."""
        return max(60.0, self.left_s())

    def release_gpu_memory(self) -> None:
        """Give this process's cached GPU memory back before a child needs it."""
        if not self.dry_run:
            import gc
            gc.collect()
            torch.cuda.empty_cache()

    def memory_reset(self) -> None:
        if not self.dry_run:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_memory(self) -> int | None:
        return None if self.dry_run else torch.cuda.max_memory_allocated()


def gemm(bench: Bench) -> None:
    from eva_open_clip.runtime.encoder import tf32_matmuls
    n = 512 if bench.dry_run else 8192
    bf16 = gemm_peak(torch.bfloat16, bench.device, n)
    with tf32_matmuls():
        tf32 = gemm_peak(torch.float32, bench.device, n)
    bench.peaks = {'bf16': bf16, 'fp32': tf32}
    bench.spec = None if bench.dry_run else spec_peaks(torch.cuda.get_device_name())
    emit('gemm', n=n, bf16_flop_per_s=bf16, fp32_tf32_flop_per_s=tf32,
         spec_bf16_flop_per_s=bench.spec and bench.spec[0], spec_fp32_tf32_flop_per_s=bench.spec and bench.spec[1])


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


def _encode_runs(bench: Bench, section: str, names: list[str], batches: list[int], precisions: list[str],
                 compiled: bool) -> None:
    from eva_open_clip.runtime.encoder import tf32_matmuls
    for name in bench.model_names(names):
        for precision in precisions:
            if bench.left_s() < 20:
                emit(section, model=name, precision=precision, skipped='time budget')
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
                with tf32_matmuls() if precision == 'fp32' and not bench.dry_run else contextlib.nullcontext():
                    rate = _rate(encode, x, bench.device, 0.5 if bench.dry_run else 4)
                spec = bench.spec and bench.spec[0 if precision == 'bf16' else 1]
                emit(section, model=name, precision=precision if precision == 'bf16' else 'fp32 (tf32)',
                     batch=batch, compiled=compiled, images_per_s=rate, flop_per_image=flops,
                     peak_fraction=rate * flops / bench.peaks[precision],
                     spec_peak_fraction=rate * flops / spec if spec else None, peak_gpu_memory=bench.peak_memory(),
                     **({'compile_and_run_s': time.perf_counter() - started} if compiled else {}),
                     seconds=time.perf_counter() - began)
                del x
            del model, encode
            bench.release_gpu_memory()


def encode(bench: Bench) -> None:
    batches = [2, 4] if bench.dry_run else [64, EMBED_BATCH]
    _encode_runs(bench, 'encode', ENCODE_MODELS, batches, ['bf16', 'fp32'], False)


def compile_section(bench: Bench) -> None:
    batch = [4] if bench.dry_run else [EMBED_BATCH]
    _encode_runs(bench, 'compile', ENCODE_MODELS, batch, ['bf16'], True)
    _encode_runs(bench, 'compile', ENCODE_MODELS[:1], batch, ['fp32'], True)


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
    bench.release_gpu_memory()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.child_timeout())
    except subprocess.TimeoutExpired:
        shutil.rmtree(out, ignore_errors=True)
        return dict(error=f'timed out after {bench.child_timeout():.0f} s')
    if result.returncode:
        shutil.rmtree(out, ignore_errors=True)
        return dict(error=result.stderr[-1500:])
    rank = json.loads((out / 'summary.json').read_text())['ranks'][0]
    shutil.rmtree(out)
    return dict(images_per_s=rank['images_per_s'], gpu_wait_fraction=rank['input_wait_s'] / rank['seconds'])


def embed(bench: Bench) -> None:
    from bench_embed import make_shards
    folder = bench.workdir / 'shards'
    folder.mkdir(exist_ok=True)
    per_shard = 50 if bench.dry_run else EMBED_PER_SHARD
    shards = make_shards(folder, per_shard * (4 if bench.dry_run else EMBED_SHARDS), per_shard=per_shard)
    for name in bench.model_names(['EVA_CLIP_g_14', 'EVA02-CLIP-L-14']):
        if bench.left_s() < 60:
            emit('embed', model=name, skipped='time budget')
            continue
        checkpoint = _checkpoint(bench, name)
        model = bench.model(name, 'bf16')
        x = torch.randn(16 if bench.dry_run else EMBED_BATCH, 3, _image_size(model), _image_size(model),
                        device=bench.device, dtype=torch.bfloat16)
        ceiling = _rate(model.encode_image, x, bench.device, 0.5 if bench.dry_run else 5)
        del model, x
        for decode in ('fast', 'exact'):
            measured = _embed(bench, name, checkpoint, shards, decode)
            ratio = measured['images_per_s'] / ceiling if 'images_per_s' in measured else None
            emit('embed', model=name, decode=decode, encode_only_images_per_s=ceiling, ratio=ratio,
                 images=per_shard * (4 if bench.dry_run else EMBED_SHARDS), cores=os.cpu_count(), **measured)
        checkpoint.unlink()
    shutil.rmtree(folder)


def decode(bench: Bench) -> None:
    from bench_decode import per_core
    for row in per_core()['rows']:
        emit('decode', **row)


LARGE = [('EVA-CLIP-8B', 'fp32'), ('EVA-CLIP-18B', 'fp16')]


def _load_child(name: str, checkpoint: str, device: str, quantize: str, config: str, timeout: float) -> dict:
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
    try:
        out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(error=f'timed out after {timeout:.0f} s')
    if out.returncode:
        return dict(error=(out.stderr.strip().splitlines() or ['killed'])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def _file_bytes(name: str, file_dtype: str) -> int:
    return sum(math.prod(shape) for shape in manifest(name).values()) * DTYPES[file_dtype].itemsize


def large(bench: Bench) -> None:
    from eva_open_clip.quantize import TORCH
    from eva_open_clip.versions import TORCH as INSTALLED
    from eva_open_clip.versions import at_least
    int8 = at_least(INSTALLED, TORCH) and importlib.util.find_spec('torchao') is not None
    for name, file_dtype in ([('tiny', 'fp32')] if bench.dry_run else LARGE):
        if bench.left_s() < 90:
            emit('large', model=name, skipped='time budget')
            continue
        checkpoint = bench.workdir / f'{name}.{file_dtype}.pt'
        if not bench.dry_run:
            needed, free = _file_bytes(name, file_dtype), shutil.disk_usage(bench.workdir).free
            if needed * 1.05 > free:
                emit('large', model=name, skipped=f'disk: the file needs {needed / 1e9:.1f} GB, '
                                                  f'{free / 1e9:.1f} GB free in {bench.workdir}')
                continue
        start = time.perf_counter()
        if bench.dry_run:
            checkpoint = _checkpoint(bench, name)
        else:
            write_checkpoint(checkpoint, manifest(name), DTYPES[file_dtype])
        written = time.perf_counter() - start
        for quantize in ('none', 'int8') if int8 else ('none',):
            bench.release_gpu_memory()
            row = _load_child(name, str(checkpoint), bench.device, quantize,
                              str(bench.config) if bench.dry_run else '', bench.child_timeout())
            emit('large', **dict(row, model=name, file_dtype=file_dtype, precision='bf16', quantize=quantize,
                                 write_seconds=written))
        checkpoint.unlink()


TRAIN_RUNS = [('EVA02-CLIP-B-16', 128), ('EVA_CLIP_g_14', 32)]


def train(bench: Bench) -> None:
    """`eva-open-clip train`, full and LoRA, per model: samples/s after the first steps, peak GPU memory."""
    from bench_embed import make_shards
    folder = bench.workdir / 'train-shards'
    folder.mkdir(exist_ok=True)
    steps = 3 if bench.dry_run else 20
    for name, batch in ([('tiny', 4)] if bench.dry_run else TRAIN_RUNS):
        if bench.left_s() < 90:
            emit('train', model=name, skipped='time budget')
            continue
        shards = make_shards(folder, steps * batch, per_shard=max(batch, steps * batch // 4))
        checkpoint = _checkpoint(bench, name)
        for lora in ((), ('--lora', '8')):
            if lora and importlib.util.find_spec('peft') is None:
                emit('train', model=name, lora=True, skipped="peft is not installed (pip install '.[lora]')")
                continue
            out = bench.workdir / f'train-{name}-{len(lora)}'
            register = ['run', '--register', f'tiny={bench.config}', '-m', 'eva_open_clip'] if bench.dry_run else []
            cmd = [sys.executable, '-m', 'eva_open_clip', *register, 'train', '--train-data', shards, '--out', str(out),
                   '--model', name, '--pretrained', str(checkpoint), '--steps', str(steps), '--batch-size',
                   str(batch), '--save-every', str(steps + 1), '--quiet', *lora]
            if bench.dry_run:
                cmd += ['--device', 'cpu', '--workers', '1']
            bench.release_gpu_memory()
            try:
                result = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.child_timeout())
            except subprocess.TimeoutExpired:
                emit('train', model=name, lora=bool(lora), error='timed out')
                continue
            if result.returncode:
                emit('train', model=name, lora=bool(lora), error=result.stderr[-1500:])
                continue
            lines = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
            timed = [line for line in lines[1:] if 'samples_per_s' in line][2:]
            emit('train', model=name, lora=bool(lora), batch=batch, params=lines[0]['params'],
                 samples_per_s=sum(line['samples_per_s'] for line in timed) / max(1, len(timed)),
                 peak_gpu_memory=timed[-1].get('peak_gpu_memory') if timed else None)
            shutil.rmtree(out)
        checkpoint.unlink()
        for shard in folder.iterdir():
            shard.unlink()
    shutil.rmtree(folder)


GIANT_RUN = ('EVA-CLIP-8B', 32, ('--lora', '8', '--precision', 'pure_bf16'))


def giant(bench: Bench) -> None:
    """EVA-CLIP-8B (bf16 file, written here) trained with `--fsdp --grad-checkpointing` and LoRA under torchrun on
    one GPU: samples/s, peak GPU memory and the memory plan's peak for the same run."""
    from bench_embed import make_shards

    from eva_open_clip import versions
    from eva_open_clip.train.plan import Setup, plan
    if not versions.at_least(versions.TORCH, versions.FSDP_TORCH):
        emit('giant', skipped=f'--fsdp needs torch >= 2.6 (installed: {versions.TORCH_VERSION})')
        return
    name, batch, extra = ('tiny', 4, ('--precision', 'fp32')) if bench.dry_run else GIANT_RUN
    if '--lora' in extra and importlib.util.find_spec('peft') is None:
        extra = tuple(e for e in extra if e not in ('--lora', '8'))  # the oldest set: full fine-tuning of tiny
    steps = 3 if bench.dry_run else 8
    folder = bench.workdir / 'giant-shards'
    folder.mkdir(exist_ok=True)
    shards = make_shards(folder, steps * batch, per_shard=steps * batch)
    if bench.dry_run:
        checkpoint = _checkpoint(bench, name)
    else:
        checkpoint = bench.workdir / f'{name}.bf16.pt'
        needed, free = _file_bytes(name, 'bf16'), shutil.disk_usage(bench.workdir).free
        if needed * 1.05 > free:
            emit('giant', model=name, skipped=f'disk: {needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free')
            return
        write_checkpoint(checkpoint, manifest(name), DTYPES['bf16'])
    out = bench.workdir / 'giant-run'
    register = ['run', '--register', f'tiny={bench.config}', '-m', 'eva_open_clip'] if bench.dry_run else []
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '1', '-m',
           'eva_open_clip', *register, 'train', '--train-data', shards, '--out', str(out), '--model', name,
           '--pretrained', str(checkpoint), '--steps', str(steps), '--batch-size', str(batch), '--save-every',
           str(steps + 1), '--quiet', '--fsdp', '--grad-checkpointing', *extra]
    if bench.dry_run:
        cmd += ['--device', 'cpu', '--workers', '1']
    lora = int(extra[extra.index('--lora') + 1]) if '--lora' in extra else None
    precision = extra[extra.index('--precision') + 1]
    planned = plan(Setup(name, 1, batch, precision, True, lora, True)).total if not bench.dry_run else None
    bench.release_gpu_memory()
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=bench.child_timeout())
    except subprocess.TimeoutExpired:
        emit('giant', model=name, error='timed out')
        return
    finally:
        checkpoint.unlink()
        shutil.rmtree(folder)
    if result.returncode:
        emit('giant', model=name, error=result.stderr[-1500:])
        return
    lines = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    timed = [line for line in lines[1:] if 'samples_per_s' in line][2:]
    emit('giant', model=name, fsdp=True, grad_checkpointing=True, lora=lora, precision=precision, batch=batch,
         params=lines[0]['params'], samples_per_s=sum(line['samples_per_s'] for line in timed) / max(1, len(timed)),
         peak_gpu_memory=timed[-1].get('peak_gpu_memory') if timed else None, planned_peak=planned)
    shutil.rmtree(out)


def tests(bench: Bench) -> None:
    """The gpu-marked tests, in a child with a timeout."""
    if bench.dry_run:
        emit('tests', skipped='no CUDA on a dry run (the gpu tests are deselected without it)')
        return
    bench.release_gpu_memory()
    cmd = [sys.executable, '-m', 'pytest', '-m', 'gpu', '-n', '0', '-q', '-p', 'no:cacheprovider',
           str(ROOT / 'tests')]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=min(bench.child_timeout(), 300),
                                cwd=ROOT)
    except subprocess.TimeoutExpired:
        emit('tests', error='timed out')
        return
    lines = result.stdout.strip().splitlines()
    emit('tests', returncode=result.returncode, summary=lines[-1] if lines else '',
         failures=[line for line in lines if line.startswith('FAILED')][:10])


SECTIONS = {'tests': tests, 'gemm': gemm, 'encode': encode, 'decode': decode, 'embed': embed, 'large': large,
            'compile': compile_section, 'train': train, 'giant': giant}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='every section, the tiny model on the CPU')
    parser.add_argument('--sections', choices=list(SETS), default=None, help='a set of sections (default: core)')
    parser.add_argument('--section', action='append', choices=list(SECTIONS), help='single sections (repeatable)')
    parser.add_argument('--budget-s', type=float, default=540, help='seconds this call may take (default: %(default)s)')
    parser.add_argument('--workdir', help='where generated files go (default: a temporary folder)')
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('gpu.py: no CUDA device here; use --dry-run to exercise it on the CPU')
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='eva-gpu-bench-'))
    workdir.mkdir(parents=True, exist_ok=True)
    bench = Bench(args.dry_run, workdir, args.budget_s)
    device = 'cpu (dry run)' if args.dry_run else torch.cuda.get_device_name()
    emit('machine', device=device, torch=torch.__version__, cores=os.cpu_count(), budget_s=args.budget_s,
         free_disk=shutil.disk_usage(workdir).free)
    if args.section:
        wanted = list(args.section)
    elif args.dry_run and not args.sections:
        wanted = list(SECTIONS)
    else:
        wanted = list(SETS[args.sections or 'core'])
    if 'gemm' not in wanted and {'encode', 'compile'} & set(wanted):
        wanted.insert(wanted.index(next(w for w in wanted if w in ('encode', 'compile'))), 'gemm')  # the yardstick
    for name in wanted:
        start = time.perf_counter()
        if not args.dry_run and bench.left_s() < COSTS[name]:
            emit(name, end=True, skipped=f'time budget: {bench.left_s():.0f} s left, it takes about {COSTS[name]} s')
            continue
        try:
            SECTIONS[name](bench)
            emit(name, end=True, seconds=time.perf_counter() - start)
        except Exception as e:  # a section that fails is said, and the next one runs
            emit(name, end=True, seconds=time.perf_counter() - start, error=f'{type(e).__name__}: {str(e)[-1500:]}')
        bench.release_gpu_memory()
    emit('done', seconds=time.perf_counter() - bench.started)
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == '__main__':
    main()
