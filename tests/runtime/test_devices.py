"""Each device's defaults and a rank's device, decided as CUDA's semantics say: bf16 by default only where the GPU
has bf16 tensor cores (compute capability 8 or more, asked of the device requested), cuda:LOCAL_RANK where each
rank sees the node's GPUs and cuda:0 where each sees only its own (srun --gpus-per-task=1). torch.cuda's
answers are set here, as this machine has no GPU; the logic under them is the package's."""
from __future__ import annotations

import pytest
import torch

from eva_open_clip.errors import UsageError
from eva_open_clip.runtime.devices import defaults_for, device_defaults, rank_device


def test_the_defaults_of_each_device():
    assert (defaults_for('cuda').precision, defaults_for('cuda').batch_size, defaults_for('cuda').decode) == \
        ('bf16', 256, 'fast')
    assert defaults_for('cuda', bf16=False).precision == 'fp16'
    assert (defaults_for('cpu').precision, defaults_for('cpu').batch_size, defaults_for('cpu').decode) == \
        ('fp32', 32, 'exact')


@pytest.fixture
def gpus(monkeypatch):
    """A machine whose GPUs have the given compute capabilities (cuda:0, cuda:1, ...); current device cuda:0."""
    def have(*capabilities: tuple[int, int]) -> list:
        asked = []

        def capability(device=None):
            index = torch.device(device).index if device is not None else 0
            asked.append(index)
            return capabilities[index]
        monkeypatch.setattr(torch.cuda, 'get_device_capability', capability)
        monkeypatch.setattr(torch.cuda, 'device_count', lambda: len(capabilities))
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: 0)
        monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)  # counts emulation: not asked
        return asked
    return have


def test_bf16_by_default_only_on_gpus_with_bf16_tensor_cores(gpus):
    asked = gpus((7, 0), (8, 0), (7, 5), (9, 0))  # V100, A100, T4, H100
    assert [device_defaults(f'cuda:{i}').precision for i in range(4)] == ['fp16', 'bf16', 'fp16', 'bf16']
    assert asked == [0, 1, 2, 3]  # each device asked about itself, not the current one
    assert device_defaults('cuda').precision == 'fp16'  # plain cuda: the current device (a V100 here)


def test_each_rank_takes_the_gpu_of_its_local_rank(gpus):
    gpus(*[(9, 0)] * 8)
    assert [rank_device('cuda', r, 8, cuda=True) for r in (0, 5)] == ['cuda:0', 'cuda:5']
    assert rank_device(None, 3, 8, cuda=True) == 'cuda:3' and rank_device(None, 3, 8, cuda=False) is None
    assert rank_device('cpu', 3, 8, cuda=True) == 'cpu' and rank_device('cuda:1', 0, 1, cuda=True) == 'cuda:1'
    with pytest.raises(UsageError, match='would put all 8 ranks of this node on one GPU'):
        rank_device('cuda:0', 2, 8, cuda=True)


def test_srun_with_one_gpu_per_task_gives_each_rank_its_only_gpu(gpus):
    gpus((9, 0))  # CUDA_VISIBLE_DEVICES names one GPU per task
    assert [rank_device('cuda', r, 4, cuda=True) for r in range(4)] == ['cuda:0'] * 4
    assert rank_device(None, 3, 4, cuda=True) == 'cuda:0'


def test_ranks_that_see_some_but_not_enough_gpus_are_refused(gpus):
    gpus((9, 0), (9, 0))
    with pytest.raises(UsageError, match='rank 3 of 4 on this node sees 2 GPUs'):
        rank_device('cuda', 3, 4, cuda=True)
