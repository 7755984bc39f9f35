"""`eva-open-clip train` on two CPU processes (torchrun, gloo): DDP against `--fsdp` on EVA02-CLIP-B-16 (full size,
random weights in the released layout), each rank's samples/s and its peak memory (VmHWM) over its memory once the
imports are done, beside the memory plan's figure for the same run; then a model as wide as EVA-CLIP-8B (its image
and text towers' widths, 2 blocks each) trained with `--fsdp --grad-checkpointing`.

    python benchmarks/bench_fsdp.py               # about 10 minutes on 2 cores
    python benchmarks/bench_fsdp.py --steps 3     # shorter

Prints one JSON line per run and one with the ratios (FSDP / DDP).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT / 'benchmarks'))


def run(folder: Path, shards: str, model: str, checkpoint: Path, steps: int, batch: int, *extra: str) -> dict:
    """One torchrun launch of two processes: the ranks' figures."""
    out = folder / ('run-' + model + '-'.join(extra).replace('--', ''))
    from bench_train import CHILD
    child = folder / 'child.py'
    child.write_text(CHILD)
    args = ['train', '--train-data', shards, '--out', str(out), '--model', model, '--pretrained', str(checkpoint),
            '--steps', str(steps), '--batch-size', str(batch), '--workers', '1', '--quiet', '--save-every',
            str(steps + 1), *extra]
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
                             str(child), *args], capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    ranks = [json.loads(line) for line in result.stdout.splitlines() if line.startswith('{"rank"')]
    lines = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    rates = [line['samples_per_s'] for line in lines[1:] if 'samples_per_s' in line][1:]
    over = max(r['peak_rss'] - r['imports_rss'] for r in ranks)
    return dict(model=model, fsdp='--fsdp' in extra, checkpointing='--grad-checkpointing' in extra, steps=steps,
                batch_per_process=batch, params=lines[0]['params'], samples_per_s=float(np.mean(rates)),
                peak_over_imports_gb=over / 1e9, planned_gb=planned(model, batch, *extra) / 1e9)


def planned(model: str, batch: int, *extra: str) -> float:
    from eva_open_clip.train.plan import Setup, plan
    return plan(Setup(model, 2, batch, 'fp32', '--fsdp' in extra, None, '--grad-checkpointing' in extra)).total


def wide_8b(folder: Path) -> tuple[str, Path]:
    """EVA-CLIP-8B's widths with 2 blocks a tower, registered, and a checkpoint of it (random, fp16)."""
    import open_clip

    import eva_open_clip
    from eva_open_clip.registry import model_configs_dir
    config = json.loads((model_configs_dir() / 'EVA-CLIP-8B.json').read_text())
    config['vision_cfg']['layers'] = config['text_cfg']['layers'] = 2
    (folder / 'wide8b.json').write_text(json.dumps(config))
    eva_open_clip.register_eva_model('EVA-CLIP-8B-wide-2', config)
    torch.manual_seed(0)
    model = open_clip.create_model('EVA-CLIP-8B-wide-2')
    path = folder / 'wide8b.pt'
    torch.save({k: v.half() for k, v in model.state_dict().items()}, path)
    return 'EVA-CLIP-8B-wide-2', path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--batch-size', type=int, default=4, help='per process (default: %(default)s)')
    args = parser.parse_args()
    from bench_train import _shards

    from support.checkpoints import full_size_checkpoint
    with tempfile.TemporaryDirectory(prefix='eva-bench-fsdp-') as tmp:
        folder = Path(tmp)
        checkpoint = folder / 'EVA02_CLIP_B_psz16_s8B.pt'
        torch.save(full_size_checkpoint('EVA02-CLIP-B-16'), checkpoint)
        shards = _shards(folder, 2, args.steps * args.batch_size + 1)
        print(json.dumps(dict(machine=f'{torch.get_num_threads()} threads', torch=torch.__version__)), flush=True)
        ddp = run(folder, shards, 'EVA02-CLIP-B-16', checkpoint, args.steps, args.batch_size)
        print(json.dumps(ddp), flush=True)
        fsdp = run(folder, shards, 'EVA02-CLIP-B-16', checkpoint, args.steps, args.batch_size, '--fsdp')
        print(json.dumps(fsdp), flush=True)
        ratios = dict(fsdp_over_ddp_peak_over_imports=fsdp['peak_over_imports_gb'] / ddp['peak_over_imports_gb'],
                      fsdp_over_ddp_samples_per_s=fsdp['samples_per_s'] / ddp['samples_per_s'])
        print(json.dumps(ratios), flush=True)
        name, wide = wide_8b(folder)
        register = ['--register', f'{name}={folder / "wide8b.json"}']
        print(json.dumps(run(folder, shards, name, wide, 2, 1, '--fsdp', '--grad-checkpointing', *register)),
              flush=True)


if __name__ == '__main__':
    main()
