"""LoRA through peft: adapters on the attention and MLP matrices of both towers (the image tower's q/k/v or fused
qkv, output projection and MLP matrices; the text tower's `nn.MultiheadAttention`, which peft adapts since 0.13,
and its MLP), every other tensor frozen; merged back into the weights for a released file (`merged_state`)."""
from __future__ import annotations

import importlib.util
from typing import Mapping

import torch
from torch import nn

from eva_open_clip.errors import UsageError, param

ADAPTER = 'default'  # peft's name for the one adapter
PEFT = '0.13'  # the first peft whose LoRA adapts nn.MultiheadAttention (open_clip's text towers)
TARGETS = (r'(visual\.trunk\.blocks\.\d+\.(attn\.(qkv|q_proj|k_proj|v_proj|proj)|mlp\.(fc1|fc1_g|fc1_x|fc2))'
           r'|text\.transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj))')


def require_peft() -> None:
    """peft of a release that adapts nn.MultiheadAttention, or a one-line error naming the extra."""
    if importlib.util.find_spec('peft') is None:
        raise UsageError(f"{param('lora')} needs peft: pip install 'eva_open_clip[lora]'")
    from importlib.metadata import version

    from packaging.version import Version
    try:
        import peft  # noqa: F401  (peft imports transformers, which may refuse this torch)
    except Exception as e:
        raise UsageError(f"{param('lora')} needs peft, which cannot be imported here ({type(e).__name__}: "
                         f"{str(e)[:160]})") from None
    if Version(version('peft')) < Version(PEFT):
        raise UsageError(f"{param('lora')} needs peft >= {PEFT} (installed: {version('peft')}): "
                         "pip install 'eva_open_clip[lora]'")


def add_adapters(model: nn.Module, rank: int, alpha: float | None, dropout: float) -> nn.Module:
    """The peft model around `model` (adapted in place): only the adapters train, and the frozen weights stay bit for
    bit (see `_keep_frozen_weights`)."""
    from peft import LoraConfig, LoraModel
    from peft.tuners.lora.layer import MultiheadAttention
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=TARGETS)
    adapted = LoraModel(model, config, ADAPTER)
    for module in model.modules():
        if isinstance(module, MultiheadAttention):
            _keep_frozen_weights(module)
        if getattr(module, 'q_bias', None) is not None and hasattr(module, 'qkv_bias_separate'):
            # timm's Eva attention with q/v biases calls F.linear with qkv's weight, bypassing qkv's forward and
            # so its adapters; adding the biases after qkv's forward (timm's own switch) lets them act
            module.qkv_bias_separate = True
    return adapted


def _keep_frozen_weights(attention: nn.Module) -> None:
    """peft's LoRA of an nn.MultiheadAttention merges the adapters into the frozen projections for each forward and
    takes them out again after it, (W + BA) - BA: the frozen weights drift by a rounding each step. They are put
    back after each forward as they were (the merge makes new tensors and never writes into the originals), the
    same Parameter objects."""
    def keep(module, args, kwargs):
        base = module.get_base_layer()
        module.eva_frozen = (base.in_proj_weight, base.out_proj.base_layer.weight)

    def put_back(module, args, kwargs, output):
        base = module.get_base_layer()
        in_proj, out_proj = module.__dict__.pop('eva_frozen')
        del base.in_proj_weight
        base.register_parameter('in_proj_weight', in_proj)
        del base.out_proj.base_layer.weight
        base.out_proj.base_layer.register_parameter('weight', out_proj)
        return output

    # peft re-wraps the frozen weights in new Parameters whenever the module tree is walked (`_restore_weights`),
    # which neither FSDP nor an optimizer can follow; with the originals put back here that is not needed
    attention._restore_weights = lambda: None
    attention.register_forward_pre_hook(keep, with_kwargs=True)
    attention.register_forward_hook(put_back, with_kwargs=True)


def merged_state(state: Mapping[str, torch.Tensor], model: str, rank: int, alpha: float | None) \
        -> dict[str, torch.Tensor]:
    """The state dict, without adapters, of registered `model` adapted with (`rank`, `alpha`) and holding `state`
    (a whole state dict: a sharded run's gathered one too), merged by peft itself. The model is built on the meta
    device and takes `state`'s tensors as they are, no second copy: they are merged into in place."""
    from eva_open_clip.empty_build import meta_model
    built = meta_model(model)
    with torch.device('meta'):
        adapted = add_adapters(built, rank, alpha, 0.0)
    shapes = {key: value.shape for key, value in built.state_dict().items()}
    built.load_state_dict({key: value.reshape(shapes[key]) for key, value in state.items()}, assign=True)
    return adapted.merge_and_unload().state_dict()
