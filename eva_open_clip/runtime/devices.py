"""The devices the tools run on: the default one, a device checked before any work, a torchrun rank's, and what a
run uses on each where its user did not say (`defaults_for`)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from eva_open_clip.errors import UsageError, param


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def check_device(device: str | None) -> None:
    """A device that torch cannot use here is refused, saying why."""
    if device is None:
        return
    named = param('device', device)
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise UsageError(f'{named}: not a torch device; give cpu, cuda, cuda:N or mps') from None
    if kind.type == 'cpu':
        return
    if kind.type == 'cuda':
        if not torch.cuda.is_available():
            why = (f'this torch ({torch.__version__}) is built without CUDA' if torch.version.cuda is None
                   else 'torch finds no CUDA GPU or driver on this machine')
            raise UsageError(f"{named}: {why}; give {param('device', 'cpu')}")
        count = torch.cuda.device_count()
        if kind.index is not None and kind.index >= count:
            raise UsageError(f'{named}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}')
        return
    if kind.type == 'mps':
        if not torch.backends.mps.is_available():
            raise UsageError(f"{named}: MPS is not available on this machine; give {param('device', 'cpu')}")
        return
    raise UsageError(f'{named}: this tool runs on cpu, cuda, cuda:N or mps')


def rank_device(device: str | None, local_rank: int, local_world_size: int, cuda: bool) -> str | None:
    """The device of one torchrun (or srun) rank: `cuda` (or none given, with CUDA present) means cuda:LOCAL_RANK
    where each rank sees the node's GPUs, and cuda:0 where each sees only its own (srun --gpus-per-task=1 sets
    CUDA_VISIBLE_DEVICES so)."""
    if device is None and not cuda:
        return None
    if device is None or device == 'cuda':
        visible = torch.cuda.device_count()
        if visible >= local_world_size:
            return f'cuda:{local_rank}'
        if visible == 1:
            return 'cuda:0'
        raise UsageError(f'rank {local_rank} of {local_world_size} on this node sees {visible} GPUs: give each rank '
                         f'its own GPU (CUDA_VISIBLE_DEVICES with one GPU per rank, or all GPUs to every rank)')
    if device.startswith('cuda:') and local_world_size > 1:
        raise UsageError(f"{param('device', device)} would put all {local_world_size} ranks of this node on one "
                         f"GPU: give {param('device', 'cuda')} (each rank takes cuda:LOCAL_RANK)")
    return device


@dataclass(frozen=True)
class Defaults:
    """What a run uses where its user did not say: the fast, correct path for its device."""

    precision: str
    batch_size: int
    decode: str
    why: str  # what they are the defaults of, for the line a run starts with


GPU_BATCH_SIZE = 256
CPU_BATCH_SIZE = 32


def defaults_for(device_type: str, bf16: bool = True) -> Defaults:
    """A GPU: bf16 weights and compute (fp16 where the GPU has no bf16 tensor cores), batches of 256, JPEGs
    decoded the fast way so that decoding keeps up. Elsewhere (the CPU, where the model is the bottleneck; MPS):
    fp32, batches of 32, open_clip's own decoding."""
    if device_type == 'cuda':
        return Defaults('bf16' if bf16 else 'fp16', GPU_BATCH_SIZE, 'fast', 'a GPU')
    return Defaults('fp32', CPU_BATCH_SIZE, 'exact', 'the CPU' if device_type == 'cpu' else device_type)


BF16_CAPABILITY = 8  # Ampere: the first GPUs whose tensor cores take bf16 (torch emulates it on older ones, slowly)


def has_fast_bf16(device: str | torch.device) -> bool:
    """Whether a CUDA device computes bf16 on its tensor cores: compute capability 8.0 or more, asked of that
    device (torch.cuda.is_bf16_supported() also counts the slow emulation of V100s and T4s, and asks the current
    device)."""
    return torch.cuda.get_device_capability(torch.device(device))[0] >= BF16_CAPABILITY


def device_defaults(device: str | None) -> Defaults:
    """The defaults of `device` (the default device when None) on this machine."""
    device = torch.device(device or default_device())
    if device.type == 'cuda' and device.index is None:
        device = torch.device('cuda', torch.cuda.current_device())
    return defaults_for(device.type, device.type != 'cuda' or has_fast_bf16(device))


_AUTOCAST = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}


def autocast(device_type: str, precision: str) -> contextlib.AbstractContextManager:
    """torch's autocast for open_clip's `amp` precisions (fp16 or bf16 compute over fp32 weights), else nothing."""
    amp = _AUTOCAST.get(precision)
    return torch.autocast(device_type, dtype=amp) if amp else contextlib.nullcontext()
