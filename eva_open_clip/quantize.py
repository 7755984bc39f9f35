"""int8 weights for EVA models (`quantize='int8'`), with torchao's kernels.

Every matrix of both towers' linear layers (the image tower's q/k/v, output, MLP and head projections; the
text tower's MLP) is stored as int8 with a float32 scale per output channel (torchao's int8 weight-only
quantization, `Int8WeightOnlyConfig`); everything else keeps the dtype of the precision asked for, in which
the activations run too: norms, embeddings, biases, the text projection, the logit scale, and the text
tower's attention projections, which torch's `nn.MultiheadAttention` passes to its own kernels (a third of
the text tower: 0.2B of EVA-CLIP-8B's and 18B's parameters). When a checkpoint is loaded, each weight is
quantized as it is filled from the mapped file (`empty_build.fill_tensor`), so that no full-precision copy
of the model ever exists: the peak is the int8 model and one layer.

A model loaded so is for inference; its towers refuse a forward pass that would train (in training mode
with gradients enabled), and the tools that rewrite weights (`export_onnx`) refuse it, each in one line.
"""
from __future__ import annotations

import functools
from importlib import metadata

import torch
from torch import nn

from .errors import UsageError, param
from .versions import UnsupportedVersion, require_torch

QUANTIZATIONS = ('int8',)
TORCHAO = (0, 10)  # the first torchao with the config API used here (Int8WeightOnlyConfig)
TORCH = (2, 6)  # the oldest torch the torchao releases with that API support
_MARK = '__eva_open_clip_quantized__'


def check(quantize: str | None) -> None:
    """Refuse a quantization this package does not make, or one the installed torch and torchao cannot."""
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise UsageError(f"{param('quantize', quantize)}: choose from {', '.join(QUANTIZATIONS)}")
    require_torch(f'quantize={quantize}', TORCH)
    try:
        installed = metadata.version('torchao')
    except metadata.PackageNotFoundError:
        raise UnsupportedVersion(f"quantize={quantize} needs torchao: pip install 'eva_open_clip[int8]'") from None
    from packaging.version import Version
    if Version(installed) < Version('.'.join(map(str, TORCHAO))):
        raise UnsupportedVersion(f"quantize={quantize} needs torchao >= {'.'.join(map(str, TORCHAO))} "
                                 f'(installed: {installed})')


def quantizable(owner: nn.Module, name: str) -> bool:
    """Whether tensor `name` of `owner` is a matrix of a linear layer stored as int8 (see the module doc): not
    an attention's output projection inside `nn.MultiheadAttention`, which torch says is not to quantize."""
    return name == 'weight' and isinstance(owner, nn.Linear) and \
        not isinstance(owner, nn.modules.linear.NonDynamicallyQuantizableLinear)


@functools.lru_cache(maxsize=None)
def _config():
    from torchao.quantization import Int8WeightOnlyConfig
    return Int8WeightOnlyConfig()


def int8_weight(weight: torch.Tensor) -> nn.Parameter:
    """`weight` ([out, in], on its device, in the activations' dtype) as torchao's int8 weight with per-row scales."""
    from torchao.quantization import quantize_
    holder = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device='meta')
    holder.weight = nn.Parameter(weight.detach(), requires_grad=False)
    quantize_(holder, _config())
    return nn.Parameter(holder.weight.detach(), requires_grad=False)


def quantize_model(model: nn.Module) -> None:
    """Store every linear matrix of `model`'s towers as int8 (for a model built without a checkpoint)."""
    for module in list(model.modules()):
        if quantizable(module, 'weight'):
            module.weight = int8_weight(module.weight)
    mark(model)


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, _MARK, False)


def mark(model: nn.Module) -> None:
    """Mark a quantized model, and make its towers refuse a forward pass that would train.

    timm's fused q/k/v projection with separate q and v biases calls `F.linear` with keyword arguments,
    which torchao's int8 weights do not take: it is told to add the bias after the projection instead (its
    own switch, `qkv_bias_separate`; the same sum).
    """
    setattr(model, _MARK, True)
    for module in model.modules():
        if getattr(module, 'q_bias', None) is not None and hasattr(module, 'qkv_bias_separate'):
            module.qkv_bias_separate = True
    for tower in (getattr(model, 'visual', None), getattr(model, 'text', None)):
        if tower is not None:
            tower.register_forward_pre_hook(_refuse_training)


def _refuse_training(module: nn.Module, _inputs) -> None:
    if module.training and torch.is_grad_enabled():
        raise UsageError('this model has int8 weights (quantize=int8), for inference only: call model.eval() or '
                         'run it under torch.no_grad(); to train, load it without quantize')


def refuse(model: nn.Module, what: str) -> None:
    """A UsageError if `model` is quantized: `what` needs its full-precision weights."""
    if is_quantized(model):
        raise UsageError(f'{what} needs the full-precision weights: load the model without quantize')


def weight_bytes(model: nn.Module, quantize: str | None = None, value_bytes: int = 2) -> int:
    """The bytes of `model`'s parameters (a meta model will do), `value_bytes` each (2: bf16), its linear
    matrices as int8 with a float32 scale per row with `quantize='int8'`."""
    total = sum(p.numel() for p in model.parameters()) * value_bytes
    if quantize:
        for module in model.modules():
            if quantizable(module, 'weight'):
                total -= module.weight.numel() * (value_bytes - 1) - module.weight.shape[0] * 4
    return total
