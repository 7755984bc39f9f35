"""The EVA image tower: timm's `Eva`, registered with timm under one name per EVA model.

open_clip builds timm image towers by name (`vision_cfg.timm_model_name`), so every registered EVA
model gets a timm entry point here that builds `Eva` with the arguments of its config. Two settings
of the EVA-CLIP-8B/18B configs are expressed here in timm terms: RMSNorm layers and a head (the image
projection) without bias.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

from timm.layers import RmsNorm
from timm.models import build_model_with_cfg, is_model, register_model
from timm.models.eva import Eva
from torch import nn

from . import versions

_ENTRYPOINTS: dict[str, Callable[..., Eva]] = {}
_NORM_LAYERS = {'rmsnorm': partial(RmsNorm, eps=1e-6)}  # 'layernorm': timm's default (eps 1e-6)


def build_eva(timm_name: str, kwargs: dict[str, Any]) -> Eva:
    """Build the timm `Eva` trunk from the tower arguments of an EVA-CLIP config."""
    kwargs = dict(kwargs)
    norm, head_bias = kwargs.pop('norm', 'layernorm'), kwargs.pop('head_bias', True)
    if norm in _NORM_LAYERS:
        kwargs['norm_layer'] = _NORM_LAYERS[norm]
    kwargs = versions.eva_kwargs(kwargs, timm_name)
    cfg = dict(architecture=timm_name, num_classes=kwargs.get('num_classes', 0),
               input_size=(3,) + tuple(2 * [kwargs['img_size']]), mean=None, std=None)
    model = build_model_with_cfg(Eva, timm_name, pretrained=False, pretrained_cfg=cfg, **kwargs)
    if not head_bias and isinstance(model.head, nn.Linear):
        head = nn.Linear(model.head.in_features, model.head.out_features, bias=False)
        head.weight = model.head.weight  # keeps timm's initialization (and its device)
        model.head = head
    return model


def is_eva_tower_name(timm_name: str) -> bool:
    """True for timm names registered by this package."""
    return timm_name in _ENTRYPOINTS


def register_tower(timm_name: str, timm_kwargs: dict[str, Any]) -> None:
    """Register a timm entry point `timm_name` that builds `Eva(**timm_kwargs)`."""
    if timm_name in _ENTRYPOINTS:
        return
    if is_model(timm_name):
        raise ValueError(f"timm already has a model named '{timm_name}'")
    arch = dict(timm_kwargs)

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: Any = None, **overrides: Any) -> Eva:
        if pretrained:
            raise ValueError(f"'{timm_name}' has no timm weights; load an EVA-CLIP checkpoint through open_clip")
        return build_eva(timm_name, {**arch, **overrides})

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'EVA image tower {timm_name} (registered by eva_open_clip).'
    register_model(entrypoint)
    _ENTRYPOINTS[timm_name] = entrypoint
