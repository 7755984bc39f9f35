"""Loading a model larger than memory: build+load time and peak RSS against the model's final size.

    python benchmarks/bench_large_load.py                                   # EVA-CLIP-8B, fp32 file, bf16 load
    python benchmarks/bench_large_load.py --model EVA_CLIP_g_14 --compare   # also open_clip's own load path
    python benchmarks/bench_large_load.py --device cuda                     # straight to the GPU

A full-size checkpoint in the released layout (every key and shape of the model's manifest, in
--file-dtype) is written by a streaming writer, so a 32.9 GB fp32 file can be made on a 24 GB machine.
Each load runs in a fresh process: `open_clip.create_model_and_transforms(NAME, pretrained=FILE,
precision=P, device=D)`. The table gives seconds, peak RSS, the model's bytes in its final dtype and
their ratio, and the RSS that importing torch and open_clip takes. With --compare (models that fit in
memory in fp32), open_clip's own path runs too: the same weights renamed to open_clip's keys, loaded
by open_clip's `EVA01-g-14`, the same architecture. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import io
import json
import math
import pickle
import struct
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
from common import child

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / 'tests' / 'data' / 'manifests'
DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
OPEN_CLIP_TWIN = {'EVA_CLIP_g_14': 'EVA01-g-14'}  # open_clip's own name for the same architecture
_ALIGN = 64  # torch.save aligns every record's data to 64 bytes


def manifest(name: str) -> dict[str, list[int]]:
    raw = json.loads((MANIFESTS / f'{name}.manifest.json').read_text())
    shapes = {k: (v['shape'] if isinstance(v, dict) else v) for k, v in raw.items()}
    return {k: s for k, s in shapes.items() if '.rope.' not in k}  # rotary tables may be absent


def _value_block(numel: int) -> torch.Tensor:
    return torch.randn(numel, generator=torch.Generator().manual_seed(0)) * 0.02


def write_checkpoint(path: Path, shapes: dict[str, list[int]], dtype: torch.dtype, chunk: int = 1 << 24) -> int:
    """Write a `torch.save`-format zip holding `shapes`, one tensor at a time; return its size in bytes.

    The pickle is made from uninitialized tensors (never touched, so never resident); each record is
    then streamed from one reused block of random values (norm weights 1, logit_scale log(100)).
    """
    tensors = {k: torch.empty(s, dtype=dtype) for k, s in shapes.items()}
    numels: list[int] = []

    class _Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, torch.storage.TypedStorage):
                numels.append(obj._size())
                return ('storage', getattr(torch, obj._pickle_storage_type()), str(len(numels) - 1), 'cpu',
                        obj._size())
            return None

    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tensors)
    block = _value_block(chunk).to(dtype)
    prefix = path.stem
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_STORED, allowZip64=True) as archive:
        archive.writestr(f'{prefix}/data.pkl', buffer.getvalue())
        archive.writestr(f'{prefix}/byteorder', 'little')
        for index, (key, tensor) in enumerate(tensors.items()):
            info = zipfile.ZipInfo(f'{prefix}/data/{index}')
            nbytes = tensor.numel() * tensor.element_size()
            zip64 = nbytes * 1.05 > zipfile.ZIP64_LIMIT
            base = archive.fp.tell() + 30 + len(info.filename.encode()) + 4 + (20 if zip64 else 0)
            pad = -base % _ALIGN
            info.extra = b'FB' + struct.pack('<H', pad) + b'Z' * pad
            with archive.open(info, 'w', force_zip64=zip64) as f:
                fill = 1.0 if tensor.ndim == 1 and key.endswith('weight') and ('norm' in key or 'ln_' in key) else None
                fill = math.log(100) if key.endswith('logit_scale') else fill
                remaining = tensor.numel()
                while remaining:
                    n = min(remaining, chunk)
                    part = torch.full([n], fill, dtype=dtype) if fill is not None else block[:n]
                    f.write(part.view(torch.uint8).numpy().tobytes())
                    remaining -= n
        archive.writestr(f'{prefix}/version', '3\n')
    return path.stat().st_size


def peak_rss() -> int:
    """This process's peak resident memory (VmHWM: unlike ru_maxrss, not inherited from the parent)."""
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith('VmHWM:'):
            return int(line.split()[1]) * 1024
    raise RuntimeError('no VmHWM in /proc/self/status')


def child_load(name: str, precision: str, checkpoint: str, device: str, register: bool, config: str = '') -> dict:
    """Build and load in this (fresh) process; time it and report the peak resident (and GPU) memory.

    `config`: an EVA-CLIP config file to register as `name` first (a custom or test architecture).
    """
    import open_clip
    if register:
        import eva_open_clip  # (registers the EVA models)
        if config:
            eva_open_clip.register_eva_model(name, json.loads(Path(config).read_text()))
    baseline = peak_rss()
    cuda = device.startswith('cuda')
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    model, _, _ = open_clip.create_model_and_transforms(name, pretrained=checkpoint, precision=precision,
                                                        device=device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    model_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    peak = peak_rss()
    gpu = dict(peak_gpu=torch.cuda.max_memory_allocated(), peak_gpu_over_model=torch.cuda.max_memory_allocated()
               / model_bytes) if cuda else {}
    return dict(impl='eva_open_clip' if register else 'open_clip', model=name, precision=precision, device=device,
                seconds=seconds, peak_rss=peak, import_rss=baseline, model_bytes=model_bytes,
                peak_over_model=peak / model_bytes,
                peak_minus_imports_over_model=(peak - baseline) / model_bytes, **gpu)


def _gb(n: float) -> str:
    return f'{n / 1e9:.2f} GB'


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--model', default='EVA-CLIP-8B')
    parser.add_argument('--file-dtype', default='fp32', choices=DTYPES)
    parser.add_argument('--precisions', nargs='+', default=['bf16', 'pure_bf16'])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--checkpoint', help='an existing file in the released layout (default: generate one)')
    parser.add_argument('--workdir', help='where the generated file goes (default: a temporary folder)')
    parser.add_argument('--keep', action='store_true', help='keep the generated file')
    parser.add_argument('--compare', action='store_true', help="also load through open_clip's own path")
    parser.add_argument('--repeats', type=int, default=1)
    parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, precision, checkpoint, device, register, *config = args.child
        print(json.dumps(child_load(name, precision, checkpoint, device, register == '1', *config)))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='eva-large-'))
    workdir.mkdir(parents=True, exist_ok=True)
    generated = []
    checkpoint = Path(args.checkpoint) if args.checkpoint else workdir / f'{args.model}.{args.file_dtype}.pt'
    if not checkpoint.exists():
        start = time.perf_counter()
        size = write_checkpoint(checkpoint, manifest(args.model), DTYPES[args.file_dtype])
        generated.append(checkpoint)
        print(f'wrote {checkpoint} ({_gb(size)}) in {time.perf_counter() - start:.0f} s', file=sys.stderr)
    runs = []
    if args.compare:
        import eva_open_clip
        renamed = workdir / f'{args.model}.open_clip_keys.pt'
        state_dict = eva_open_clip.convert_state_dict(torch.load(str(checkpoint), mmap=True, weights_only=True))
        torch.save(state_dict, renamed)
        del state_dict
        generated.append(renamed)
    for _ in range(args.repeats):
        for precision in args.precisions:
            runs.append(child(__file__, args.model, precision, str(checkpoint), args.device, '1'))
            if args.compare:
                runs.append(child(__file__, OPEN_CLIP_TWIN[args.model], precision, str(renamed), args.device, '0'))
    for path in generated if not args.keep else []:
        path.unlink()

    print(f'{"impl":<14} {"model":<16} {"precision":<10} {"seconds":>8} {"peak RSS":>10} {"model":>10} '
          f'{"imports":>9} {"peak/model":>10} {"(peak-imports)/model":>21}')
    for r in runs:
        if 'error' in r:
            print(f'failed: {r}')
            continue
        print(f'{r["impl"]:<14} {r["model"]:<16} {r["precision"]:<10} {r["seconds"]:>8.1f} {_gb(r["peak_rss"]):>10} '
              f'{_gb(r["model_bytes"]):>10} {_gb(r["import_rss"]):>9} {r["peak_over_model"]:>10.3f} '
              f'{r["peak_minus_imports_over_model"]:>21.3f}')
    ok = [r for r in runs if 'error' not in r]
    for precision in args.precisions:
        ours = [r['seconds'] for r in ok if r['impl'] == 'eva_open_clip' and r['precision'] == precision]
        theirs = [r['seconds'] for r in ok if r['impl'] == 'open_clip' and r['precision'] == precision]
        if ours and theirs:
            print(f'{precision}: eva_open_clip is {min(theirs) / min(ours):.2f}x faster than open_clip (best of each)')
    print(json.dumps(dict(model=args.model, file_dtype=args.file_dtype, file=str(checkpoint), runs=runs)))


if __name__ == '__main__':
    main()
