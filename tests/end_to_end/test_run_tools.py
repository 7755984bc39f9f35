"""`eva-open-clip run`: open_clip's own trainer (and any tool) with the EVA models registered."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys

import pytest
import torch

from eva_open_clip import versions
from support.checkpoints import golden, needs_trainer, released_state_dict
from support.cli import run_cli

TRAIN = ['-m', versions.TRAINER_MODULE, '--dataset-type', 'synthetic', '--epochs', '1', '--workers', '0',
         *(['--device', 'cpu'] if versions.open_clip_at_least((2, 29)) else []), '--lr', '1e-3', '--warmup', '1',
         '--zeroshot-frequency', '0', '--seed', '0',
         '--precision', 'fp32']
pytestmark = needs_trainer()


def _run(*args, cwd, launcher=None, timeout=900):
    """`eva-open-clip ARGS` in `cwd`, unbuffered (the trainer's log lines are read)."""
    return run_cli(*args, cwd=cwd, launcher=launcher, timeout=timeout, env={'PYTHONUNBUFFERED': '1'})


def _losses(log: str) -> list[float]:
    return [float(x) for x in re.findall(r' Loss: ([-\d.einfa]+) ', log)]


@pytest.fixture()
def tiny_files(tmp_path):
    (tmp_path / 'tiny.json').write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), tmp_path / 'tiny.pt')
    return tmp_path


def test_trainer_on_a_tiny_model_updates_every_tower(tiny_files):
    result = _run('run', '--register', 'tiny=tiny.json', *TRAIN,
                   '--model', 'tiny', '--pretrained', 'tiny.pt', '--train-num-samples', '8', '--batch-size', '4',
                   '--logs', str(tiny_files / 'logs'), '--name', 'tiny', cwd=tiny_files)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    losses = _losses(log)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # written by the trainer just now (open_clip < 2.29 stores numpy scalars beside the weights)
    trained = torch.load(tiny_files / 'logs' / 'tiny' / 'checkpoints' / 'epoch_1.pt', weights_only=False)['state_dict']
    before = released_state_dict('tiny_a')
    assert not torch.equal(trained['visual.trunk.blocks.0.attn.qkv.weight'],
                           before['visual.blocks.0.attn.qkv.weight'].float())
    assert not torch.equal(trained['text.transformer.resblocks.0.attn.in_proj_weight'],
                           before['text.transformer.resblocks.0.attn.in_proj_weight'].float())


def test_trainer_distributed_on_cpu_with_torchrun(tiny_files):
    torchrun = shutil.which('torchrun', path=os.path.dirname(sys.executable)) or shutil.which('torchrun')
    # torchrun's own options include --logs-specs, so '--logs' cannot follow it: logs go to ./logs
    result = _run('run', '--register', 'tiny=tiny.json', *TRAIN, '--model', 'tiny', '--pretrained', 'tiny.pt',
                  '--train-num-samples', '8', '--batch-size', '2', '--name', 'ddp', '--dist-backend', 'gloo',
                  cwd=tiny_files, launcher=(torchrun, '--standalone', '--nproc_per_node', '2', '-m', 'eva_open_clip'))
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    assert 'Running in distributed mode with multiple processes' in log and 'total 2' in log
    assert (tiny_files / 'logs' / 'ddp' / 'checkpoints' / 'epoch_1.pt').is_file()
    assert len(_losses(log)) == 2


def test_arguments_and_exit_code_pass_through(tmp_path):
    script = tmp_path / 'tool.py'
    script.write_text('import sys, open_clip\n'
                      'assert "EVA_CLIP_g_14" in open_clip.list_models()\n'
                      'print(sys.argv)\nsys.exit(3)\n')
    result = _run('run', str(script), '--model', 'x', '-m', 'y', cwd=tmp_path)
    assert result.returncode == 3
    assert result.stdout.strip() == str([str(script), '--model', 'x', '-m', 'y'])
    result = _run('run', '-m', versions.TRAINER_MODULE, '--no-such-flag', cwd=tmp_path)
    assert result.returncode == 2 and '--no-such-flag' in result.stderr


@pytest.mark.full_size
def test_trainer_on_full_size_g14_with_locked_image_tower(tmp_path, g14_checkpoint):
    result = _run('run', *TRAIN, '--model', 'EVA_CLIP_g_14', '--pretrained', str(g14_checkpoint),
                  '--lock-image', '--train-num-samples', '4', '--batch-size', '2', '--logs', 'none', cwd=tmp_path)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    losses = _losses(log)
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
