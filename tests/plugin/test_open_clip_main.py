"""The plugin against open_clip's next major (its main branch, 4.2.0.dev0, vendored in tests/data/vendor): every EVA
model answers `fsdp_shard_modules()` with its blocks, and that trainer's `--fsdp` on two CPU processes shards an EVA
model block by block, with its layer-wise rate decay acting on both EVA towers.

open_clip's main branch is installed into a folder of its own (`pip --target`, no dependencies: they are open_clip
3.x's) and put first on the trainer's path, so it runs with this environment's torch and timm."""
from __future__ import annotations

import copy
import gc
import json
import re
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch

from eva_open_clip import versions
from eva_open_clip.sharding import shard_modules
from support.checkpoints import golden, needs_trainer, register_reference, released_state_dict
from support.cli import TORCHRUN, run_cli

ARCHIVE = Path(__file__).parent.parent / 'data' / 'vendor' / 'open_clip-main-89fb801.tar.gz'
needs_fsdp = pytest.mark.skipif(not versions.at_least(versions.TORCH, versions.FSDP_TORCH),
                                reason="open_clip's FSDP2 trainer needs torch >= 2.6")


@pytest.fixture(scope='module')
def open_clip_main(tmp_path_factory) -> Path:
    target = tmp_path_factory.mktemp('open_clip_main')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target', str(target), str(ARCHIVE)],
                   check=True, capture_output=True, timeout=600)
    return target


def test_every_model_answers_fsdp_shard_modules_with_its_blocks(tiny):
    model = tiny[1]
    names = [name for name, _ in model.fsdp_shard_modules()]
    depth = len(model.visual.trunk.blocks)
    assert names == [f'visual.trunk.blocks.{i}' for i in range(depth)] + \
        [f'text.transformer.resblocks.{i}' for i in range(len(model.text.transformer.resblocks))]
    assert all(model.get_submodule(name) is block for name, block in model.fsdp_shard_modules())
    import open_clip
    built = open_clip.create_model(register_reference('tiny_a'))  # without a file, too
    assert [n for n, _ in built.fsdp_shard_modules()] == names
    assert shard_modules(built)[0][1] is built.visual.trunk.blocks[0]
    copied = copy.deepcopy(built)
    assert copied.fsdp_shard_modules()[0][1] is copied.visual.trunk.blocks[0]
    assert not hasattr(open_clip.create_model('RN50'), 'fsdp_shard_modules')  # other models as open_clip has them
    # nothing ties a model to itself: it is freed as soon as it is dropped, without the garbage collector
    gc.disable()
    try:
        dropped = weakref.ref(built)
        del built
        assert dropped() is None
    finally:
        gc.enable()


@needs_trainer()
@needs_fsdp
def test_its_trainer_shards_an_eva_model_block_by_block(open_clip_main, tmp_path):
    (tmp_path / 'tiny.json').write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), tmp_path / 'tiny.pt')
    env = {'PYTHONPATH': str(open_clip_main), 'PYTHONUNBUFFERED': '1'}
    version = subprocess.run([sys.executable, '-c', 'from importlib.metadata import version; '
                              'print(version("open_clip_torch"))'], capture_output=True, text=True, env=env)
    assert version.stdout.strip() == '4.2.0.dev0', version.stderr
    result = run_cli('run', '--register', 'tiny=tiny.json', '-m', 'open_clip_train.main', '--dataset-type', 'synthetic',
                     '--epochs', '1', '--workers', '0', '--device', 'cpu', '--lr', '1e-3', '--warmup', '1',
                     '--zeroshot-frequency', '0', '--seed', '0', '--precision', 'fp32', '--model', 'tiny',
                     '--pretrained', 'tiny.pt', '--train-num-samples', '8', '--batch-size', '2', '--name', 'fsdp',
                     '--dist-backend', 'gloo', '--fsdp', '--grad-checkpointing', '--image-layer-decay', '0.8',
                     '--text-layer-decay', '0.9', cwd=tmp_path, env=env, launcher=TORCHRUN, timeout=900)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-3000:]
    config = golden('tiny_a')['config']
    blocks = config['vision_cfg']['layers'] + config['text_cfg']['layers']
    assert f'FSDP2: sharding {blocks} submodules' in log  # open_clip's own default finds the text blocks only
    losses = [float(x) for x in re.findall(r' Loss: ([-\d.einfa]+) ', log)]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    # the decay reaches each tower's depth: the image tower's 0.8 ** k and the text tower's 0.9 ** k
    decay = next(line for line in log.splitlines() if 'Layer-wise LR decay' in line)
    scales = {float(s) for s in re.findall(r'lr_scale=([\d.]+)/wd', decay)}
    image_depth = config['vision_cfg']['layers']
    assert {round(0.8 ** k, 3) for k in range(1, image_depth + 2)} <= {round(s, 3) for s in scales}, decay
    assert round(0.9 ** 2, 3) in {round(s, 3) for s in scales}, decay
    trained = torch.load(tmp_path / 'logs' / 'fsdp' / 'checkpoints' / 'epoch_1.pt', weights_only=False)['state_dict']
    before = released_state_dict('tiny_a')
    assert not torch.equal(trained['visual.trunk.blocks.0.attn.qkv.weight'],
                           before['visual.blocks.0.attn.qkv.weight'].float())
