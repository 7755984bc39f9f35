"""`eva-open-clip train` on the tiny reference model, through the command line: the loss falls on a learnable task;
a run killed with SIGKILL and started again ends with the uninterrupted run's weights, whatever its workers;
two processes under torchrun; LoRA trains the adapters only and its merged released file equals the adapted
model; the released layout round trip; each bad input answered in one line."""
from __future__ import annotations

import copy
import io
import signal

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import eva_open_clip
from support.checkpoints import register_reference
from support.cli import TORCHRUN, error_line, main_here, run_cli
from support.embed import TINY
from support.train import COLORS, png, run_log, train_args, train_here, train_process, wait_until_saved, weights

pytestmark = pytest.mark.xdist_group('train')


def test_the_loss_falls_on_a_learnable_task(tiny, data, tmp_path):
    out = tmp_path / 'run'
    result = train_here(tiny, data, out, '--steps', '40', '--warmup', '4', '--val-data', data['val'],
                         '--val-every', '20', '--visual-layer-decay', '0.9', '--text-layer-decay', '0.8')
    assert result.returncode == 0, result.stderr[-3000:]
    first, lines = run_log(out)
    steps = [line for line in lines if 'loss' in line and 'val' not in line]
    assert [s['step'] for s in steps] == list(range(1, 41))
    assert first['params']['trainable'] == first['params']['total'] == sum(p.numel() for p in tiny[1].parameters())
    assert first['settings']['visual_layer_decay'] == 0.9
    losses = [s['loss'] for s in steps]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
    vals = [line['val'] for line in lines if 'val' in line]
    assert len(vals) == 2 and vals[-1]['pairs'] == 16 and vals[-1]['loss'] < vals[0]['loss'] + 1e-9
    assert steps[0]['lr']['visual'] == pytest.approx(5e-4 / 4)  # warm-up's first step, the top layer's rate
    assert steps[-1]['lr']['visual'] < 1e-6  # cosine to 0


def test_a_killed_run_resumes_to_the_uninterrupted_runsweights(tiny, data, tmp_path):
    args = ('--steps', '60', '--save-every', '7', '--warmup', '5')
    reference = tmp_path / 'reference'
    assert train_here(tiny, data, reference, *args, '--workers', '2').returncode == 0
    out = tmp_path / 'killed'
    job = train_process(tiny, data, out, *args, '--workers', '1', background=True)
    wait_until_saved(job, out / 'checkpoint.pt', 24)
    job.send_signal(signal.SIGKILL)
    job.wait()
    killed_at = len(run_log(out)[1])
    assert 14 <= torch.load(out / 'checkpoint.pt', weights_only=True)['step'] < 60
    resumed = train_here(tiny, data, out, *args, '--workers', '0')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    ours, theirs = weights(out), weights(reference)
    assert ours.keys() == theirs.keys()
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) <= 1e-6
    steps = run_log(out)[1]
    assert [s['step'] for s in steps] == list(range(1, 61)), killed_at  # each step logged once
    assert [s['loss'] for s in steps] == pytest.approx([s['loss'] for s in run_log(reference)[1]], abs=1e-6)


def test_two_processes_under_torchrun(tiny, data, tmp_path):
    out = tmp_path / 'ddp'
    result = run_cli('run', '--register', f'{TINY}={tiny[0] / "tiny.json"}', '-m', 'eva_open_clip',
                     *train_args(tiny, data, out, '--steps', '6', '--save-every', '3', '--workers', '1',
                                  '--lock-image'), launcher=TORCHRUN[:-2] + ('-m', 'eva_open_clip'))
    assert result.returncode == 0, result.stderr[-3000:]
    first, steps = run_log(out)
    assert first['world_size'] == 2 and [s['step'] for s in steps] == list(range(1, 7))
    visual = sum(p.numel() for p in tiny[1].visual.parameters())
    assert first['params']['trainable'] == first['params']['total'] - visual
    assert all(np.isfinite(s['loss']) for s in steps)
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert len(state['positions']) == len(state['rng']) == 2  # each rank's place in its own shards
    other = train_here(tiny, data, out, '--steps', '8', '--save-every', '3', '--workers', '1')
    assert error_line(other, 2).endswith(f'{out} holds another run (lock_image: True there, False now): give its '
                                         'settings to resume it, or a new --out folder')
    # on one process: both data streams, each batch of 8 as the two processes took them
    again = train_here(tiny, data, out, '--steps', '8', '--save-every', '3', '--workers', '1', '--lock-image')
    assert again.returncode == 0, again.stderr[-3000:]
    assert [s['step'] for s in run_log(out)[1]] == list(range(1, 9))
    state = torch.load(out / 'checkpoint.pt', weights_only=True)
    assert state['step'] == 8 and [p['taken'] for p in state['positions']] == [16, 16]  # 8 pairs a step in each


def _features(model, tiny) -> torch.Tensor:
    _, _, preprocess, tokenizer = tiny
    images = torch.stack([preprocess(Image.open(io.BytesIO(png(c, 7)))) for c in COLORS.values()])
    with torch.no_grad():
        return torch.cat([model.encode_image(images, normalize=True),
                          model.encode_text(tokenizer([f'a {c} square' for c in COLORS]), normalize=True)])


def test_the_released_layout_round_trip(tiny, data, tmp_path):
    out, released = tmp_path / 'run', tmp_path / 'tuned.pt'
    assert train_here(tiny, data, out, '--steps', '3', '--save-released', released, '--grad-checkpointing',
                       '--opt', 'lamb').returncode == 0
    original = torch.load(tiny[0] / 'tiny.pt', weights_only=True)
    tuned = torch.load(released, weights_only=True)
    assert {k: (v.shape, v.dtype) for k, v in tuned.items()} == {k: (v.shape, v.dtype) for k, v in original.items()}
    name = register_reference('tiny_a')
    model = open_clip.create_model(name, pretrained=str(released)).eval()
    trained = weights(out)
    for key, value in model.state_dict().items():  # the trained weights, in the file's fp16
        assert torch.equal(value, trained[key].half().float()), key
    assert not torch.equal(tuned['visual.blocks.0.attn.qkv.weight'], original['visual.blocks.0.attn.qkv.weight'])
    result = main_here('classify', '--model', TINY, '--pretrained', released, '--json')
    assert result.returncode == 0, result.stderr[-2000:]
    from eva_open_clip import eva_clip
    repository_model, _, _ = eva_clip.create_model_and_transforms(name, str(released), force_custom_clip=True)
    assert torch.equal(_features(repository_model.eval(), tiny), _features(model, tiny))
    folder = tmp_path / 'swatches'
    folder.mkdir()
    for i, rgb in enumerate(COLORS.values()):
        (folder / f'{i}.png').write_bytes(png(rgb, 7))
    assert main_here('embed', folder, '--out', tmp_path / 'e.npy', '--model', TINY, '--pretrained',
                     released).returncode == 0
    assert np.allclose(np.load(tmp_path / 'e.npy'), _features(model, tiny)[:len(COLORS)].numpy(), atol=1e-6)


needs_peft = pytest.mark.skipif(__import__('importlib').util.find_spec('peft') is None,
                                reason="LoRA needs peft: pip install 'eva_open_clip[lora]'")


@needs_peft
def test_lora_trains_the_adapters_only_and_its_merged_file_is_the_adapted_model(tiny, data, tmp_path):
    from eva_open_clip.train.lora import add_adapters
    out, released = tmp_path / 'lora', tmp_path / 'lora.pt'
    result = train_here(tiny, data, out, '--steps', '6', '--lora', '4', '--lora-alpha', '8', '--lr', '5e-3',
                         '--save-released', released)
    assert result.returncode == 0, result.stderr[-3000:]
    first, _ = run_log(out)
    state = weights(out)
    adapters = {k: v for k, v in state.items() if 'lora_' in k}
    assert first['params']['trainable'] == sum(v.numel() for v in adapters.values()) > 0
    # every adapter trained (B starts at 0), the fused qkv's of an image tower with q/v biases too
    assert all(v.abs().max() > 0 for k, v in adapters.items() if '.lora_B.' in k), \
        [k for k, v in adapters.items() if '.lora_B.' in k and not v.abs().max() > 0]
    assert any('text.transformer.resblocks.0.attn' in k for k in adapters)  # the text tower's MultiheadAttention
    assert any('visual.trunk.blocks.0.mlp' in k for k in adapters)
    name = register_reference('tiny_a')
    base = open_clip.create_model(name, pretrained=str(tiny[0] / 'tiny.pt')).eval()
    adapted_model = open_clip.create_model(name, pretrained=str(tiny[0] / 'tiny.pt'))
    adapted = add_adapters(adapted_model, 4, 8, 0.0)
    fresh = adapted_model.state_dict()
    assert fresh.keys() == state.keys()
    for key, value in fresh.items():  # every tensor but the adapters bit for bit as loaded
        if 'lora_' not in key:
            assert torch.equal(state[key], value), key
    adapted_model.load_state_dict(state)
    # the merge of the state dict (which a sharded run gathers) is peft's merge
    from eva_open_clip.train.lora import merged_state
    peft_merged = copy.deepcopy(adapted).merge_and_unload().state_dict()
    ours = merged_state(copy.deepcopy(adapted_model.state_dict()), name, 4, 8)  # it merges into what it is given
    assert ours.keys() == peft_merged.keys()
    assert max((ours[k] - peft_merged[k]).abs().max().item() for k in ours) == 0
    merged = open_clip.create_model(name, pretrained=str(released)).eval()
    adapted_model.eval()
    # the released file is fp16, as the original: the merged weights are rounded there
    assert torch.allclose(_features(merged, tiny), _features(adapted_model, tiny), atol=2e-3)
    assert not torch.allclose(_features(merged, tiny), _features(base, tiny), atol=2e-3)
    del adapted


@pytest.mark.parametrize('args, line', [
    (('--steps', '0'), '--steps must be at least 1'),
    (('--steps', '2', '--lora', '0'), '--lora 0: the LoRA rank must be at least 1'),
    (('--steps', '2', '--lora', '2', '--lora-alpha', '0'), '--lora-alpha 0: the LoRA alpha must be more than 0'),
    (('--steps', '2', '--visual-layer-decay', '1.5'), '--visual-layer-decay must be more than 0 and at most 1'),
    (('--steps', '2', '--lock-image', '--lock-text'), '--lock-image and --lock-text leave nothing to train (but '
                                                      'logit_scale): unlock a tower, or give --lora'),
])
def test_bad_arguments_are_one_line(tiny, data, tmp_path, args, line):
    result = train_here(tiny, data, tmp_path / 'x', *args)
    assert error_line(result, 2) == f'eva-open-clip train: {line}'


def test_shards_without_captions_are_one_line(tiny, data, tmp_path):
    result = main_here('train', '--train-data', data['bare'], '--out', tmp_path / 'x', '--model', TINY, '--pretrained',
                       tiny[0] / 'tiny.pt', '--steps', '2', '--quiet')
    assert error_line(result, 2) == ('eva-open-clip train: no sample of --train-data has a caption under '
                                     '--caption-key txt: train needs image-caption pairs')


def test_a_model_without_a_file_is_one_line(tiny, data, tmp_path):
    try:
        result = main_here('train', '--train-data', data['train'], '--out', tmp_path / 'x', '--register',
                           f'nofile={tiny[0] / "tiny.json"}', '--model', 'nofile', '--steps', '2')
    finally:
        eva_open_clip.unregister_eva_model('nofile')  # registered by --register in this process
    assert error_line(result, 2) == ('eva-open-clip train: --model nofile has no pretrained tag: pass --pretrained '
                                     '/path/to/checkpoint')


@pytest.mark.skipif(__import__('importlib').util.find_spec('peft') is not None, reason='peft is installed')
def test_lora_without_peft_names_the_extra(tiny, data, tmp_path):
    result = train_here(tiny, data, tmp_path / 'x', '--steps', '2', '--lora', '4')
    assert error_line(result, 2) == "eva-open-clip train: --lora needs peft: pip install 'eva_open_clip[lora]'"
