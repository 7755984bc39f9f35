"""`train --fsdp`: the model sharded across the processes of a torchrun job with torch's FSDP2 (`fully_shard` on
every image block and every text block, `sharding.shard_modules`, then on the root), so that each process holds
1/N of the weights, gradients and optimizer state and gathers one block at a time.

On a GPU with a bf16 precision the blocks compute in bf16 from fp32 weights and reduce their gradients in fp32
(`MixedPrecisionPolicy(bf16, fp32)`); elsewhere they compute in the weights' dtype. FSDP2 shards along dim 0, so a
0-D parameter (`logit_scale`) becomes 1-D of one element first; its value and its checkpoint keys are unchanged
(the released layout is written in the template's shapes, `released`).
"""
from __future__ import annotations

import torch
from torch import nn

from eva_open_clip.sharding import shard_modules

BF16_PRECISIONS = ('amp_bf16', 'amp_bfloat16', 'bf16', 'pure_bf16')


def shard(model: nn.Module, precision: str) -> None:
    """Shard `model` in place across the default process group (see the module doc)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    for name, param in list(model.named_parameters()):
        if param.ndim == 0:
            owner, _, attr = name.rpartition('.')
            module = model.get_submodule(owner) if owner else model
            setattr(module, attr, nn.Parameter(param.detach().reshape(1), requires_grad=param.requires_grad))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if precision in BF16_PRECISIONS and next(model.parameters()).is_cuda else MixedPrecisionPolicy()
    for _, block in shard_modules(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    for method in ('encode_image', 'encode_text'):  # gathered as the forward is, for the evaluation
        register_fsdp_forward_method(model, method)


def full_value(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded tensor's whole value (a collective), or the tensor itself."""
    return tensor.full_tensor() if hasattr(tensor, 'full_tensor') else tensor


def full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole state dict on rank 0's CPU, gathered one tensor at a time (a collective; empty on the other
    ranks): one full copy, never two."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
