"""ONNX Runtime on the CPU against open_clip eager: image-encoding throughput of `export-onnx`'s fp32 and
int8 graphs, the export's time and peak memory, and what int8 changes in the embeddings.

    python benchmarks/bench_onnx_cpu.py --models EVA02-CLIP-B-16                  # about 6 minutes on 2 cores
    python benchmarks/bench_onnx_cpu.py --models EVA_CLIP_g_14 --seconds 0 --min-batches 1   # about 30

Full-size checkpoints in the released layout are generated (random values; real weights cannot be
downloaded here). Each measurement runs in a fresh process: eager is the command line's own encoder
(`embed`'s), ONNX Runtime a default CPU session (all cores, default graph optimizations); each warms
up on one image, then times at least --min-batches batches and --seconds. Accuracy:
cosine of int8 to fp32 image embeddings of the reference images (tests/data/images), and whether the
zero-shot top-1 over a few labels changes (int8 image and text graphs against fp32 ones). Prints a
table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from bench_large_load import peak_rss
from common import child, encode_only

ROOT = Path(__file__).resolve().parent.parent
IMAGES = ROOT / 'tests' / 'data' / 'images'
LABELS = ['a diagram', 'a dog', 'a cat', 'a gradient', 'noise', 'a palette of colours', 'a photo', 'text']


def child_export(name: str, checkpoint: str, out: str, quantize: str) -> dict:
    """`eva-open-clip export-onnx` in this (fresh) process: seconds and peak resident memory."""
    from eva_open_clip import cli
    args = ['export-onnx', name, out, '--pretrained', checkpoint] + (['--quantize', quantize] if quantize else [])
    start = time.perf_counter()
    code = cli.main(args)
    if code:
        raise SystemExit(code)
    size = sum(p.stat().st_size for p in Path(out).rglob('*.onnx*'))
    return dict(seconds=time.perf_counter() - start, peak_rss=peak_rss(), bytes=size)


def child_ort(folder: str, batch: int, seconds: float, min_batches: int) -> dict:
    """Images/s of the visual graph in a default CPU session, after a warm-up run on one image."""
    import onnxruntime as ort
    preprocess = json.loads((Path(folder) / 'visual' / 'preprocess_cfg.json').read_text())
    session = ort.InferenceSession(str(Path(folder) / 'visual' / 'model.onnx'), providers=['CPUExecutionProvider'])
    x = torch.randn(batch, 3, *preprocess['size']).numpy()
    session.run(None, {'image': x[:1]})
    n, start = 0, time.perf_counter()
    while n < min_batches * batch or time.perf_counter() - start < seconds:
        session.run(None, {'image': x})
        n += batch
    return dict(images_per_s=n / (time.perf_counter() - start))


def child_accuracy(fp32: str, int8: str, name: str) -> dict:
    """Cosine of int8 to fp32 image embeddings of the reference images, and the zero-shot top-1 of each."""
    import onnxruntime as ort
    import open_clip
    from PIL import Image

    from eva_open_clip import list_eva_models  # registers the models, whose tokenizer this takes
    assert name in list_eva_models(), name
    cfg = json.loads((Path(fp32) / 'visual' / 'preprocess_cfg.json').read_text())
    transform = open_clip.image_transform(cfg['size'], is_train=False, mean=cfg['mean'], std=cfg['std'],
                                          interpolation=cfg['interpolation'], resize_mode=cfg['resize_mode'])
    pixels = torch.stack([transform(Image.open(p).convert('RGB')) for p in sorted(IMAGES.glob('*.png'))]).numpy()
    tokens = open_clip.get_tokenizer(name)(LABELS).int().numpy()
    out = {}
    for kind, folder in (('fp32', fp32), ('int8', int8)):
        run = {part: ort.InferenceSession(str(Path(folder) / part / 'model.onnx'), providers=['CPUExecutionProvider'])
               for part in ('visual', 'textual')}
        out[kind] = (run['visual'].run(None, {'image': pixels})[0], run['textual'].run(None, {'text': tokens})[0])
    cosine = (out['fp32'][0] * out['int8'][0]).sum(-1)
    top1 = {kind: (image @ text.T).argmax(-1).tolist() for kind, (image, text) in out.items()}
    return dict(images=len(pixels), cosine_min=float(cosine.min()), cosine_mean=float(cosine.mean()),
                top1_fp32=top1['fp32'], top1_int8=top1['int8'],
                top1_changed=int(sum(a != b for a, b in zip(top1['fp32'], top1['int8']))))


def generate(name: str, workdir: Path) -> Path:
    sys.path.insert(0, str(ROOT / 'tests'))
    from support.checkpoints import full_size_checkpoint
    path = workdir / f'{name}.pt'
    torch.save(full_size_checkpoint(name), path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--models', nargs='+', default=['EVA02-CLIP-B-16', 'EVA_CLIP_g_14'])
    parser.add_argument('--batches', nargs='+', type=int, default=[1, 8])
    parser.add_argument('--seconds', type=float, default=15.0, help='least time per throughput measurement')
    parser.add_argument('--min-batches', type=int, default=3, help='least batches per throughput measurement')
    parser.add_argument('--workdir', default=None)
    parser.add_argument('--child', nargs='+', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {'export': lambda: child_export(*rest[:3], rest[3] if len(rest) > 3 else ''),
                  'ort': lambda: child_ort(rest[0], int(rest[1]), float(rest[2]), int(rest[3])),
                  'accuracy': lambda: child_accuracy(*rest)}[kind]()
        print(json.dumps(result))
        return
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='bench-onnx-'))
    script = Path(__file__)
    results = []
    for name in args.models:
        checkpoint = generate(name, workdir)
        folders = {kind: workdir / f'{name}-{kind}' for kind in ('fp32', 'int8')}
        exports = {kind: child(script, 'export', name, str(checkpoint), str(folder), '' if kind == 'fp32' else kind)
                   for kind, folder in folders.items()}
        row = dict(model=name, exports=exports, accuracy=child(script, 'accuracy', str(folders['fp32']),
                                                                 str(folders['int8']), name), speed={})
        for batch in args.batches:
            eager = encode_only(name, checkpoint, batch, batches=args.min_batches, min_seconds=args.seconds,
                                warmup_rows=1)['images_per_s']
            ort = {kind: child(script, 'ort', str(folder), str(batch), str(args.seconds),
                               str(args.min_batches))['images_per_s']
                   for kind, folder in folders.items()}
            row['speed'][batch] = dict(eager=eager, **{f'ort_{k}': v for k, v in ort.items()})
        results.append(row)
        checkpoint.unlink()
    print(f"{'model':<18}{'batch':>6}{'eager img/s':>13}{'ORT fp32':>10}{'ratio':>7}{'ORT int8':>10}{'ratio':>7}")
    for row in results:
        for batch, s in row['speed'].items():
            print(f"{row['model']:<18}{batch:>6}{s['eager']:>13.3g}{s['ort_fp32']:>10.3g}"
                  f"{s['ort_fp32'] / s['eager']:>7.2f}{s['ort_int8']:>10.3g}{s['ort_int8'] / s['eager']:>7.2f}")
    for row in results:
        a, e = row['accuracy'], row['exports']
        print(f"{row['model']}: int8 cosine to fp32 min {a['cosine_min']:.4f} mean {a['cosine_mean']:.4f} over "
              f"{a['images']} images, zero-shot top-1 changed on {a['top1_changed']}; export fp32 "
              f"{e['fp32']['seconds']:.0f} s, peak {e['fp32']['peak_rss'] / 2**30:.1f} GiB, "
              f"{e['fp32']['bytes'] / 2**30:.2f} GiB written; int8 {e['int8']['seconds']:.0f} s, peak "
              f"{e['int8']['peak_rss'] / 2**30:.1f} GiB, {e['int8']['bytes'] / 2**30:.2f} GiB written")
    print(json.dumps(dict(torch=torch.__version__, threads=torch.get_num_threads(), results=results)))


if __name__ == '__main__':
    main()
