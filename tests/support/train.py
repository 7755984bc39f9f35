"""Training data and run folders for the `train` tests: shards of colour swatches captioned with their colour (a
task the tiny model learns in a few dozen steps), the command line of a run, and what its folder holds."""
from __future__ import annotations

import io
import json
import tarfile
import time

import numpy as np
import torch
from PIL import Image

from support.checkpoints import register_reference
from support.cli import main_here, run_cli
from support.embed import TINY, add_member

COLORS = {'red': (220, 30, 30), 'green': (30, 200, 40), 'blue': (30, 40, 220), 'yellow': (230, 220, 30),
          'black': (10, 10, 10), 'white': (245, 245, 245), 'purple': (140, 30, 160), 'orange': (240, 140, 20)}


def png(rgb, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(rgb)[None, None] + rng.integers(-12, 13, (48, 48, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, 'PNG')
    return buffer.getvalue()


def shards(root, count: int, per_shard: int, captions: bool = True, offset: int = 0) -> str:
    """Shards of colour swatches captioned with their colour: a task the tiny model learns in a few dozen steps."""
    root.mkdir(parents=True, exist_ok=True)
    names = list(COLORS)
    for s in range(count):
        with tarfile.open(root / f'{s:03d}.tar', 'w') as tf:
            for i in range(per_shard):
                n = offset + s * per_shard + i
                color = names[n % len(names)]
                add_member(tf, f'{n:05d}.png', png(COLORS[color], n))
                if captions:
                    add_member(tf, f'{n:05d}.txt', f'a {color} square'.encode())
    return str(root / ('{000..%03d}.tar' % (count - 1)))


def train_args(tiny, data, out, *args) -> list:
    return ['train', '--train-data', data['train'], '--out', out, '--model', TINY, '--pretrained', tiny[0] / 'tiny.pt',
            '--batch-size', '8', '--lr', '5e-4', '--quiet', *args]


def train_here(tiny, data, out, *args):
    register_reference('tiny_a')
    return main_here(*train_args(tiny, data, out, *args))


def train_process(tiny, data, out, *args, **kwargs):
    return run_cli('run', '--register', f'{TINY}={tiny[0] / "tiny.json"}', '-m', 'eva_open_clip',
                   *train_args(tiny, data, out, *args), **kwargs)


def run_log(out) -> tuple[dict, list[dict]]:
    lines = [json.loads(line) for line in (out / 'log.jsonl').read_text().splitlines()]
    return lines[0], lines[1:]


def weights(out) -> dict[str, torch.Tensor]:
    return torch.load(out / 'checkpoint.pt', weights_only=True)['model']


def wait_until_saved(job, checkpoint, steps: int) -> None:
    """Wait (5 minutes at most) until the background run `job` has written `checkpoint` and logged `steps` lines,
    and is still running (so that it can be killed mid-run)."""
    out = checkpoint.parent
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        if checkpoint.exists() and len(run_log(out)[1]) >= steps:
            break
        time.sleep(0.01)
    assert job.poll() is None, 'the run ended before it could be killed'
