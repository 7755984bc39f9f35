"""`eva-open-clip train --fsdp` on two CPU processes (gloo): the same losses and weights as DDP on the same data; a
sharded run killed with SIGKILL resumes to the uninterrupted run's weights, on two processes or on one; LoRA and
activation checkpointing compose with it and its released file is DDP's; what cannot work is one line."""
from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from eva_open_clip import versions
from eva_open_clip.train.data import Share
from support.checkpoints import golden
from support.cli import TORCHRUN, error_line, main_here, run_cli
from support.train import run_log, wait_until_saved

pytestmark = [pytest.mark.xdist_group('train'),
              pytest.mark.skipif(not versions.at_least(versions.TORCH, versions.FSDP_TORCH),
                                 reason='--fsdp needs torch >= 2.6')]
TOLERANCE = 1e-4  # fp32: DDP and FSDP reduce the same gradients in another order


def launcher(processes: int) -> tuple:
    return TORCHRUN[:4] + ('--nproc_per_node', str(processes), '-m', 'eva_open_clip')


@pytest.fixture(scope='module')
def model_files(tiny, tmp_path_factory):
    """tiny_a without drop path (its random masks would differ on another number of processes)."""
    folder = tmp_path_factory.mktemp('fsdp-model')
    config = golden('tiny_a')['config']
    config['vision_cfg']['drop_path_rate'] = 0.0
    (folder / 'tiny.json').write_text(json.dumps(config))
    return folder / 'tiny.json', tiny[0] / 'tiny.pt'


def train(model_files, data, out, *args, processes: int = 2, **kwargs):
    config, weights = model_files
    return run_cli('run', '--register', f'tiny0={config}', '-m', 'eva_open_clip', 'train', '--train-data',
                   data['train'], '--out', out, '--model', 'tiny0', '--pretrained', weights, '--batch-size', '8',
                   '--lr', '5e-4', '--warmup', '2', '--quiet', '--workers', '1', *args,
                   launcher=launcher(processes), **kwargs)


def sharded_weights(out) -> dict[str, torch.Tensor]:
    """The model of a sharded run's last checkpoint, whole (torch's DCP to torch.save conversion)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    record = json.loads((out / 'checkpoint.json').read_text())
    whole = out.parent / f'{out.name}-whole.pt'
    dcp_to_torch_save(out / 'checkpoint' / record['folder'], whole)
    return {k: v.reshape(()) if k == 'logit_scale' else v
            for k, v in torch.load(whole, weights_only=True)['model'].items()}


def closest(ours: dict, theirs: dict) -> float:
    assert ours.keys() == theirs.keys()
    return max((ours[k].float() - theirs[k].float()).abs().max().item() for k in ours)


def losses(out) -> list[float]:
    return [s['loss'] for s in run_log(out)[1] if 'loss' in s and 'val' not in s]


@pytest.fixture(scope='module')
def reference(model_files, data, tmp_path_factory):
    """A sharded run of 24 steps, uninterrupted, evaluated at the end, its weights written in the released layout."""
    out = tmp_path_factory.mktemp('fsdp') / 'reference'
    result = train(model_files, data, out, '--fsdp', '--steps', '24', '--save-every', '4', '--val-data', data['val'],
                   '--val-every', '24', '--save-released', out.parent / 'reference.pt')
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_fsdp_and_ddp_give_the_same_losses_and_weights(model_files, data, reference, tmp_path):
    ddp = tmp_path / 'ddp'
    result = train(model_files, data, ddp, '--steps', '24', '--save-every', '4', '--save-released', tmp_path / 'ddp.pt')
    assert result.returncode == 0, result.stderr[-3000:]
    # the released files: the sharded run's gathered on rank 0, in the template's keys, shapes and dtypes
    released, ddp_released = (torch.load(p, weights_only=True) for p in (reference.parent / 'reference.pt',
                                                                         tmp_path / 'ddp.pt'))
    original = torch.load(model_files[1], weights_only=True)
    assert {k: (v.shape, v.dtype) for k, v in released.items()} == {k: (v.shape, v.dtype) for k, v in original.items()}
    assert closest(released, ddp_released) <= 1e-3  # fp16 files: one rounding step at most
    assert losses(reference) == pytest.approx(losses(ddp), abs=TOLERANCE)
    assert len(losses(reference)) == 24 and losses(reference)[-1] < losses(reference)[0]
    ddp_weights = torch.load(ddp / 'checkpoint.pt', weights_only=True)['model']
    assert closest(sharded_weights(reference), ddp_weights) <= TOLERANCE
    first, lines = run_log(reference)
    assert first['settings']['fsdp'] is True and first['world_size'] == 2
    assert [line['val']['pairs'] for line in lines if 'val' in line] == [16]  # evaluated on every process, logged once
    assert sorted(p.name for p in (reference / 'checkpoint').iterdir()) == ['step-00000024']  # older ones removed


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun starts each rank in a session of its own)."""
    found = []
    for entry in os.listdir('/proc'):
        try:
            with open(f'/proc/{entry}/stat') as f:
                if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    found.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return found


def _killed(model_files, data, out) -> None:
    job = train(model_files, data, out, '--fsdp', '--steps', '24', '--save-every', '4', background=True)
    wait_until_saved(job, out / 'checkpoint.json', 6)
    for pid in [job.pid] + children(job.pid):  # torchrun and every rank at once, as a lost machine
        os.kill(pid, signal.SIGKILL)
    job.wait()


def test_a_killed_sharded_run_resumes_to_the_uninterrupted_runs_weights_on_two_processes_or_one(
        model_files, data, reference, tmp_path):
    out = tmp_path / 'killed'
    _killed(model_files, data, out)
    step = json.loads((out / 'checkpoint.json').read_text())['step']
    assert step in (4, 8, 12, 16, 20)
    alone = tmp_path / 'alone'
    shutil.copytree(out, alone)
    for folder, processes in ((out, 2), (alone, 1)):
        resumed = train(model_files, data, folder, '--fsdp', '--steps', '24', '--save-every', '4',
                        processes=processes)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert [s['step'] for s in run_log(folder)[1]] == list(range(1, 25))  # each step logged once
        assert losses(folder) == pytest.approx(losses(reference), abs=1e-5)
        ours, theirs = sharded_weights(folder), sharded_weights(reference)
        if processes == 1:
            # The text attention's key bias has a gradient of exactly 0 (adding it to every key shifts each row of
            # logits by one constant, which softmax ignores); what it gets is rounding noise, which AdamW scales up
            # by 1/eps and which differs when one process sums the gradients of both halves. Every other tensor
            # agrees within 1e-6.
            for key in [k for k in ours if k.endswith('attn.in_proj_bias')]:
                width = ours[key].shape[0] // 3
                ours[key], theirs[key] = (t[torch.arange(3 * width) // width != 1] for t in (ours[key], theirs[key]))
        assert closest(ours, theirs) <= 1e-6, processes


@pytest.mark.skipif(__import__('importlib').util.find_spec('peft') is None,
                    reason="LoRA needs peft: pip install 'eva_open_clip[lora]'")
def test_lora_and_checkpointing_compose_with_fsdp_and_its_released_file_is_ddps(model_files, data, tmp_path):
    files = {}
    for name, extra in (('fsdp', ('--fsdp',)), ('ddp', ())):
        files[name] = tmp_path / f'{name}.pt'
        result = train(model_files, data, tmp_path / name, *extra, '--steps', '4', '--lora', '4',
                       '--grad-checkpointing', '--save-released', files[name])
        assert result.returncode == 0, result.stderr[-3000:]
    assert losses(tmp_path / 'fsdp') == pytest.approx(losses(tmp_path / 'ddp'), abs=TOLERANCE)
    fsdp, ddp = (torch.load(files[n], weights_only=True) for n in ('fsdp', 'ddp'))
    original = torch.load(model_files[1], weights_only=True)
    assert {k: (v.shape, v.dtype) for k, v in fsdp.items()} == {k: (v.shape, v.dtype) for k, v in original.items()}
    assert closest(fsdp, ddp) <= 1e-3  # fp16 files: one rounding step at most
    assert not torch.equal(fsdp['visual.blocks.0.attn.qkv.weight'], original['visual.blocks.0.attn.qkv.weight'])


def test_fsdp_outside_torchrun_is_one_line(model_files, data, tmp_path):
    config, weights = model_files
    result = main_here('train', '--train-data', data['train'], '--out', tmp_path / 'x', '--register',
                       f'tiny0={config}', '--model', 'tiny0', '--pretrained', weights, '--steps', '2', '--fsdp')
    assert error_line(result, 2) == ('eva-open-clip train: --fsdp shards the model across the processes of a '
                                     'torchrun launch: run it under torchrun (torchrun --nproc-per-node N -m '
                                     'eva_open_clip train ...)')


def test_which_streams_a_process_reads():
    assert Share.of(0, 2, 2, 8) == Share((0,)) and Share.of(1, 2, 2, 8) == Share((1,))
    assert Share.of(0, 1, 2, 8) == Share((0, 1))  # fewer processes: whole streams
    assert Share.of(3, 4, 2, 8) == Share((1,), 1, 2)  # more: a part of each batch
    with pytest.raises(Exception, match='resume it on a number of processes that divides 4'):
        Share.of(0, 3, 4, 8)
    with pytest.raises(Exception, match='divides the batch size'):
        Share.of(0, 4, 1, 6)


@pytest.mark.gpu
def test_fsdp_on_a_gpu_computes_in_bf16_from_fp32_weights(model_files, data, tmp_path):
    """On CUDA (NCCL, one process): bf16 compute and fp32 gradient reduction from fp32 sharded weights, the peak
    GPU memory logged, the checkpoint's weights fp32."""
    out = tmp_path / 'gpu'
    result = train(model_files, data, out, '--fsdp', '--steps', '4', '--device', 'cuda', '--precision', 'amp_bf16',
                   processes=1)
    assert result.returncode == 0, result.stderr[-3000:]
    steps = [s for s in run_log(out)[1] if 'loss' in s]
    assert len(steps) == 4 and all(s['peak_gpu_memory'] > 0 for s in steps)
    assert all(v.dtype == torch.float32 for v in sharded_weights(out).values())
