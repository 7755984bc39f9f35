"""Benchmark EVA_CLIP_g_14: build+load time and peak memory against open_clip's EVA01-g-14, and
encode throughput as a fraction of the machine's measured GEMM peak.

    python benchmarks/bench_g14.py                       # CPU: loading (fp32, bf16) and throughput
    python benchmarks/bench_g14.py --device cuda --precisions fp16 bf16 --batches 64 --skip-load

A full-size fp16 checkpoint in the released layout is generated (random values, every released key
and shape) unless --checkpoint names one; open_clip's EVA01-g-14 loads the same weights with the keys
renamed (`eva_open_clip.convert_state_dict`). Each measurement runs in a fresh process, the two
implementations alternating, so peak RSS is per load. Prints a table, then one JSON line.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from bench_large_load import peak_rss  # VmHWM: not inherited from this parent process
from common import child, gemm_peak, sync

ROOT = Path(__file__).resolve().parent.parent
MANIFEST = ROOT / 'tests' / 'data' / 'manifests' / 'EVA_CLIP_g_14.manifest.json'
IMPLS = {'eva_open_clip': 'EVA_CLIP_g_14', 'open_clip': 'EVA01-g-14'}


def generate(workdir: Path, checkpoint: str | None, renamed_too: bool) -> tuple[Path, Path]:
    """The released-layout checkpoint and (if asked) the same weights renamed for open_clip's EVA01-g-14."""
    import eva_open_clip
    released = Path(checkpoint) if checkpoint else workdir / 'eva_clip_psz14.pt'
    renamed = workdir / 'eva01_g14_open_clip.pt'
    if not released.exists():
        gen = torch.Generator().manual_seed(0)
        shapes = json.loads(MANIFEST.read_text())
        sd = {}
        for key, shape in shapes.items():
            t = torch.empty(shape)
            if key.endswith('logit_scale'):
                t.fill_(math.log(100))
            elif t.ndim == 1 and ('norm' in key or 'ln_' in key) and key.endswith('weight'):
                t.fill_(1)
            else:
                t.normal_(0, 0.02, generator=gen)
            sd[key] = t.half()
        torch.save(sd, released)
        del sd
    if renamed_too and not renamed.exists():
        sd = torch.load(released, mmap=True, weights_only=True)
        torch.save(eva_open_clip.convert_state_dict(sd), renamed)
    return released, renamed


def child_load(impl: str, precision: str, checkpoint: str) -> dict:
    """Build and load in this (fresh) process; time it and report the peak resident memory."""
    import open_clip
    if impl == 'eva_open_clip':
        import eva_open_clip  # noqa: F401  (registers EVA_CLIP_g_14)
    baseline = peak_rss()
    start = time.perf_counter()
    model = open_clip.create_model(IMPLS[impl], pretrained=checkpoint, precision=precision)
    seconds = time.perf_counter() - start
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = peak_rss()
    return dict(impl=impl, precision=precision, seconds=seconds, peak_rss=peak, import_rss=baseline,
                model_bytes=params, peak_over_model=peak / params)


def child_throughput(precision: str, checkpoint: str, device: str, compile_: str, batches: list[int]) -> dict:
    """Images/s and texts/s of EVA_CLIP_g_14 at each batch size, with FLOP/s over the GEMM peak.

    On the CPU one call at the largest batch warms up (and sizes the reused heap, as the command-line
    tools do: see eva_open_clip/cpu_memory.py), then each batch size is timed once (a g/14 image takes
    seconds); on a GPU each size is warmed up, then timed over 5 calls.
    """
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    import eva_open_clip  # noqa: F401
    from eva_open_clip.cpu_memory import keep_freed_memory
    model = open_clip.create_model('EVA_CLIP_g_14', pretrained=checkpoint, precision=precision, device=device).eval()
    gpu = device.startswith('cuda')
    if not gpu:
        keep_freed_memory()
    encode_image, encode_text = model.encode_image, model.encode_text
    if compile_ == 'compile':  # torch's own compiler, weights frozen into the graph (inference only)
        from torch._inductor import config as inductor_config
        inductor_config.freezing = True
        encode_image, encode_text = torch.compile(encode_image), torch.compile(encode_text)
    dtype = open_clip.get_input_dtype(precision) or torch.float32
    tokenizer = open_clip.get_tokenizer('EVA_CLIP_g_14')
    peak = gemm_peak(dtype, device)
    results = {'precision': precision, 'device': device, 'compiled': compile_ == 'compile',
               'gemm_peak_flops': peak, 'batches': []}
    with torch.inference_mode():
        image1 = torch.randn(1, 3, 224, 224, device=device, dtype=dtype)
        text1 = tokenizer(['a photo of a cat']).to(device)
        with FlopCounterMode(display=False) as counter:
            model.encode_image(image1)
        image_flops = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.encode_text(text1)
        text_flops = counter.get_total_flops()
        results.update(image_flops=image_flops, text_flops=text_flops)
        if not gpu:
            encode_image(image1.expand(max(batches), -1, -1, -1).contiguous())
            encode_text(text1.expand(max(batches), -1).contiguous())
        iters = 5 if gpu else 1
        for batch in batches:
            images = image1.expand(batch, -1, -1, -1).contiguous()
            texts = text1.expand(batch, -1).contiguous()
            row = {'batch': batch}
            for kind, fn, inputs, flops in (('image', encode_image, images, image_flops),
                                            ('text', encode_text, texts, text_flops)):
                if gpu or compile_ == 'compile':
                    fn(inputs)  # warm-up (and compilation) at this shape
                sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fn(inputs)
                sync(device)
                seconds = (time.perf_counter() - start) / iters
                row[f'{kind}_per_s'] = batch / seconds
                row[f'{kind}_gemm_fraction'] = batch * flops / seconds / peak
            results['batches'].append(row)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--checkpoint', help='an existing eva_clip_psz14.pt (default: generate one)')
    parser.add_argument('--workdir', help='where generated checkpoints go (default: a temporary folder)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--precisions', nargs='+', default=['fp32', 'bf16'])
    parser.add_argument('--batches', nargs='+', type=int, default=[1, 8, 32])
    parser.add_argument('--repeats', type=int, default=2, help='load measurements per implementation and precision')
    parser.add_argument('--skip-load', action='store_true')
    parser.add_argument('--skip-throughput', action='store_true')
    parser.add_argument('--compile', action='store_true',
                        help='also time torch.compile (inductor, frozen weights) of encode_image/encode_text')
    parser.add_argument('--child', nargs='+', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == 'load':
            result = child_load(*rest)
        else:
            precision, checkpoint, device, compile_, *batches = rest
            result = child_throughput(precision, checkpoint, device, compile_, [int(b) for b in batches])
        print(json.dumps(result))
        return

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='bench_g14.'))
    workdir.mkdir(parents=True, exist_ok=True)
    released, renamed = generate(workdir, args.checkpoint, renamed_too=not args.skip_load)
    report: dict = {'machine': {'cpus': os.cpu_count(), 'torch': torch.__version__, 'device': args.device}}
    if args.device.startswith('cuda'):
        report['machine']['gpu'] = torch.cuda.get_device_name()

    if not args.skip_load:
        loads = []
        for r in range(args.repeats):
            for precision in args.precisions:
                order = list(IMPLS) if r % 2 == 0 else list(IMPLS)[::-1]
                for impl in order:
                    ckpt = released if impl == 'eva_open_clip' else renamed
                    loads.append(child(__file__, 'load', impl, precision, str(ckpt)))
        report['load'] = []
        print(f"{'load':<14}{'precision':>10}{'seconds':>10}{'peak RSS GB':>13}{'peak/model':>12}{'speedup':>9}")
        for precision in args.precisions:
            best = {impl: min((x for x in loads if x['impl'] == impl and x['precision'] == precision),
                              key=lambda x: x['seconds']) for impl in IMPLS}
            speedup = best['open_clip']['seconds'] / best['eva_open_clip']['seconds']
            for impl in IMPLS:
                x = best[impl]
                print(f"{impl:<14}{precision:>10}{x['seconds']:>10.2f}{x['peak_rss'] / 1e9:>13.2f}"
                      f"{x['peak_over_model']:>12.2f}{speedup if impl == 'eva_open_clip' else 1:>9.2f}")
                report['load'].append(dict(x, speedup=speedup if impl == 'eva_open_clip' else 1.0))

    if not args.skip_throughput:
        report['throughput'] = []
        print(f"\n{'throughput':<12}{'batch':>6}{'images/s':>10}{'img/GEMM peak':>15}{'texts/s':>10}"
              f"{'txt/GEMM peak':>15}{'GEMM peak TFLOP/s':>19}")
        modes = ['eager', 'compile'] if args.compile else ['eager']
        for precision, mode in itertools.product(args.precisions, modes):
            result = child(__file__, 'throughput', precision, str(released), args.device, mode, *map(str, args.batches))
            report['throughput'].append(result)
            label = precision + ('+compile' if mode == 'compile' else '')
            for row in result['batches']:
                print(f"{label:<12}{row['batch']:>6}{row['image_per_s']:>10.3f}{row['image_gemm_fraction']:>15.2f}"
                      f"{row['text_per_s']:>10.2f}{row['text_gemm_fraction']:>15.2f}"
                      f"{result['gemm_peak_flops'] / 1e12:>19.3f}")
    print(json.dumps(report))


if __name__ == '__main__':
    main()
