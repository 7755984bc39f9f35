"""`train --plan`: each process's memory computed from the model built on the meta device, against what torch's own
memory tracker measures in real training steps of the same model; on the command line before any download; a run
whose plan does not fit is refused in one line naming what would make it fit."""
from __future__ import annotations

import importlib.util

import open_clip
import pytest
import torch

import eva_open_clip
from eva_open_clip.empty_build import meta_model
from eva_open_clip.train.plan import FITS, GB, Setup, plan
from support.checkpoints import golden
from support.cli import error_line, main_here
from support.embed import TINY
from support.train import train_here

MARGIN = 0.10  # the plan's peak against the tracker's: within 10%


@pytest.fixture(scope='module')
def mid_model():
    """An EVA02-style model big enough for its tensors to outweigh the tracker's overheads (10.6M parameters)."""
    config = golden('e02_tiny_a')['config']
    config['vision_cfg'].update(image_size=112, layers=4, width=256, head_width=64)
    config['text_cfg'].update(width=128, layers=4, heads=4)
    config['embed_dim'] = 128
    eva_open_clip.register_eva_model('plan-mid', config)
    yield 'plan-mid'
    eva_open_clip.unregister_eva_model('plan-mid')


def _measured(name: str, batch: int, checkpointing: bool) -> dict[str, float]:
    """The peak of each category over two training steps, as torch's MemTracker sees every tensor made."""
    from torch.distributed._tools.mem_tracker import MemTracker
    torch.manual_seed(0)
    model = open_clip.create_model(name).train()
    model.set_grad_checkpointing(checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    loss = open_clip.ClipLoss()
    images, tokens = torch.randn(batch, 3, 112, 112), torch.randint(0, 1000, (batch, 77))
    tracker = MemTracker()
    tracker.track_external(model, optimizer)
    with tracker:
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            loss(*model(images, tokens)[:3]).backward()
            optimizer.step()
            tracker.reset_mod_stats()
    peak = tracker.get_tracker_snapshot('peak')
    return {str(kind).rsplit('.', 1)[-1]: float(size) for kind, size in peak[next(iter(peak))].items()}


@pytest.mark.skipif(importlib.util.find_spec('torch.distributed._tools.mem_tracker') is None,
                    reason="torch's MemTracker comes with torch >= 2.5")
@pytest.mark.parametrize('checkpointing', [False, True])
def test_the_plan_is_what_torchs_memory_tracker_measures(mid_model, checkpointing):
    planned = plan(Setup(mid_model, batch_size=16, grad_checkpointing=checkpointing))
    measured = _measured(mid_model, 16, checkpointing)
    assert planned.weights == measured['PARAM']  # fp32, every parameter
    assert abs(planned.total - measured['Total']) <= MARGIN * measured['Total'], (planned.total, measured)
    if not checkpointing:  # the peak is the backward pass's: the activations are most of it
        assert abs(planned.activations - measured['ACT']) <= MARGIN * measured['ACT'], (planned.activations, measured)
    else:  # checkpointing leaves the optimizer step the peak
        assert planned.total > planned.passes


def test_plans_for_the_giants_on_the_command_line_download_nothing():
    result = main_here('train', '--plan', '--model', 'EVA-CLIP-8B', '--processes', '64', '--fsdp',
                       '--grad-checkpointing', '--precision', 'amp_bf16', '--batch-size', '32', '--memory', '80')
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    assert lines[0].startswith('memory plan of EVA-CLIP-8B (8.22B parameters, 8.22B trained) on 64 process(es), '
                               'precision amp_bf16, --batch-size 32 --fsdp --grad-checkpointing')
    parameters = sum(p.numel() for p in meta_model('EVA-CLIP-8B').parameters())
    weights = next(line for line in lines if line.strip().startswith('weights'))
    assert float(weights.split()[-2]) == pytest.approx(parameters * 4 / 64 / GB, abs=0.006)
    assert lines[-1] == f'fits in --memory 80 (80 GB, of which {FITS:.0%} usable)'
    alone = main_here('train', '--plan', '--model', 'EVA-CLIP-18B', '--precision', 'pure_bf16', '--memory', '24')
    assert alone.returncode == 0 and alone.stdout.splitlines()[-1].startswith('does not fit in --memory 24')
    from eva_open_clip.train import train
    planned = train(plan=True, model='EVA-CLIP-8B', processes=64, fsdp=True, grad_checkpointing=True,
                    precision='amp_bf16', batch_size=32, memory=80)  # the same from Python
    assert str(planned).splitlines()[1:-1] == lines[1:-1] and planned.fits()


def test_a_run_that_does_not_fit_is_refused_in_one_line_naming_what_fits(tiny, data, tmp_path):
    memory = round(plan(Setup(TINY, batch_size=8)).total / GB / FITS * 0.98, 6)  # just short of fitting
    result = train_here(tiny, data, tmp_path / 'run', '--steps', '2', '--memory', f'{memory:.6f}')
    line = error_line(result, 2)
    assert line.startswith(f'eva-open-clip train: {TINY} does not fit in --memory {memory:g}: its plan needs ')
    assert line.endswith('--plan shows each part')
    assert not (tmp_path / 'run').exists()  # refused before the run folder is made
    fix = line.split('; give ')[1].split(' (')[0].split()  # the nearest settings that fit, as flags
    assert '--grad-checkpointing' in fix  # the first thing to try
    again = train_here(tiny, data, tmp_path / 'run', '--steps', '2', '--memory', f'{memory:.6f}', *fix)
    assert again.returncode == 0, again.stderr[-2000:]
