"""`eva-open-clip train` on this CPU: EVA02-CLIP-B-16 (full size, random weights in the released layout), full
fine-tuning against LoRA (rank 8), without and with `--grad-checkpointing`, each in a fresh process: samples/s over
the steps after the first two (which include start-up), and the process's peak memory (VmHWM) over its memory
once the imports are done.

    python benchmarks/bench_train.py               # about 12 minutes on 2 cores
    python benchmarks/bench_train.py --steps 4     # shorter

Prints one JSON line per run and one per pair with the ratios (LoRA / full).
"""
from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))

CHILD = '''
import json, os, sys
def rss(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from eva_open_clip import cli
import eva_open_clip.train.run  # the imports, before the baseline
base = rss('VmRSS')
code = cli.main(sys.argv[1:])
print(json.dumps(dict(rank=int(os.environ.get('RANK', 0)), code=code, imports_rss=base, peak_rss=rss('VmHWM'))),
      flush=True)
'''  # a process's peak memory over its imports (one line per torchrun rank)


def _shards(folder: Path, shards: int, per_shard: int) -> str:
    rng = np.random.default_rng(0)
    for s in range(shards):
        with tarfile.open(folder / f'{s:03d}.tar', 'w') as tf:
            for i in range(per_shard):
                pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels).resize((320, 240), Image.BILINEAR).save(buffer, 'JPEG', quality=90)
                for ext, data in (('jpg', buffer.getvalue()), ('txt', f'picture {s} {i}'.encode())):
                    info = tarfile.TarInfo(f'{s:03d}{i:04d}.{ext}')
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    return str(folder / ('{000..%03d}.tar' % (shards - 1)))


def run(folder: Path, shards: str, checkpoint: Path, steps: int, batch: int, *extra: str) -> dict:
    out = folder / ('run' + '-'.join(extra).replace('--', ''))
    args = ['train', '--train-data', shards, '--out', str(out), '--model', 'EVA02-CLIP-B-16', '--pretrained',
            str(checkpoint), '--steps', str(steps), '--batch-size', str(batch), '--workers', '1', '--quiet',
            '--save-every', str(steps + 1), *extra]
    result = subprocess.run([sys.executable, '-c', CHILD, *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    memory = json.loads(result.stdout.strip().splitlines()[-1])
    lines = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    rates = [line['samples_per_s'] for line in lines[1:] if 'samples_per_s' in line][2:]
    return dict(variant='lora' if '--lora' in extra else 'full', checkpointing='--grad-checkpointing' in extra,
                params=lines[0]['params'],
                samples_per_s=float(np.mean(rates)), peak_rss_gb=memory['peak_rss'] / 1e9,
                over_imports_gb=(memory['peak_rss'] - memory['imports_rss']) / 1e9, steps=steps, batch=batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=6)
    parser.add_argument('--batch-size', type=int, default=16)
    args = parser.parse_args()
    from support.checkpoints import full_size_checkpoint
    with tempfile.TemporaryDirectory(prefix='eva-bench-train-') as tmp:
        folder = Path(tmp)
        checkpoint = folder / 'EVA02_CLIP_B_psz16_s8B.pt'
        torch.save(full_size_checkpoint('EVA02-CLIP-B-16'), checkpoint)
        shards = _shards(folder, 2, args.steps * args.batch_size // 2 + 1)
        print(json.dumps(dict(machine=f'{torch.get_num_threads()} threads', torch=torch.__version__)), flush=True)
        for checkpointing in ((), ('--grad-checkpointing',)):
            full = run(folder, shards, checkpoint, args.steps, args.batch_size, *checkpointing)
            print(json.dumps(full), flush=True)
            lora = run(folder, shards, checkpoint, args.steps, args.batch_size, '--lora', '8', *checkpointing)
            print(json.dumps(lora), flush=True)
            print(json.dumps(dict(checkpointing=bool(checkpointing),
                                  lora_over_full_samples_per_s=lora['samples_per_s'] / full['samples_per_s'],
                                  lora_over_full_peak_over_imports=lora['over_imports_gb'] / full['over_imports_gb'],
                                  trainable_lora_over_full=lora['params']['trainable'] / full['params']['trainable'])),
                  flush=True)


if __name__ == '__main__':
    main()
