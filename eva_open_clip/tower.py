"""The EVA image tower: timm's `Eva`, registered with timm under one name per EVA model.

open_clip builds timm image towers by name (`vision_cfg.timm_model_name`), so every registered EVA
model gets a timm entry point here that builds `Eva` with the arguments of its config. Two settings
of the EVA-CLIP-8B/18B configs are expressed here in timm terms: RMSNorm layers and a head (the image
projection) without bias.
"""
from __future__ import annotations

import functools
import json
from functools import partial
from typing import Any, Callable

import timm
from timm.layers import RmsNorm
from timm.models import build_model_with_cfg, get_pretrained_cfg, is_model, register_model
from timm.models.eva import Eva
from torch import nn

from . import versions
from .empty_build import empty_build

_ENTRYPOINTS: dict[str, Callable[..., Eva]] = {}  # every timm entry point this package made (timm keeps them)
_ARCHS: dict[str, dict[str, Any]] = {}  # the registered towers' arguments, read when timm builds one
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
    return timm_name in _ARCHS


def register_tower(timm_name: str, timm_kwargs: dict[str, Any]) -> None:
    """Register a timm entry point `timm_name` that builds `Eva(**timm_kwargs)`."""
    if timm_name not in _ENTRYPOINTS and is_model(timm_name):
        raise ValueError(f"timm already has a model named '{timm_name}'")
    _ARCHS[timm_name] = dict(timm_kwargs)
    if timm_name in _ENTRYPOINTS:  # registered before, then unregistered: timm still holds its entry point
        return

    def entrypoint(pretrained: bool = False, pretrained_cfg: Any = None, pretrained_cfg_overlay: Any = None,
                   cache_dir: Any = None, **overrides: Any) -> Eva:
        if pretrained:
            raise ValueError(f"'{timm_name}' has no timm weights; load an EVA-CLIP checkpoint through open_clip")
        if timm_name not in _ARCHS:
            raise ValueError(f"the EVA image tower '{timm_name}' was unregistered")
        return build_eva(timm_name, {**_ARCHS[timm_name], **overrides})

    entrypoint.__name__ = entrypoint.__qualname__ = timm_name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f'EVA image tower {timm_name} (registered by eva_open_clip).'
    register_model(entrypoint)
    _ENTRYPOINTS[timm_name] = entrypoint


def unregister_tower(timm_name: str) -> None:
    """Forget the tower `timm_name` (timm keeps its entry point, which now refuses to build it)."""
    _ARCHS.pop(timm_name, None)


def _signature(model: Eva) -> tuple:
    """What makes two towers the same function of the same weights: every module with its kind and settings
    (its `extra_repr`, heads, rotary grid), every tensor's name and shape, the pooling."""
    modules = tuple((name, type(m).__name__, m.extra_repr(), getattr(m, 'num_heads', None),
                     repr(getattr(m, 'ref_feat_shape', None)), repr(getattr(m, 'feat_shape', None)))
                    for name, m in model.named_modules())
    shapes = tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())
    return modules, shapes, model.global_pool, model.num_prefix_tokens


@functools.lru_cache(maxsize=None)
def _stock_signature(name: str, num_classes: int, global_pool: str) -> tuple:
    with empty_build('meta'):  # no memory for weights (older timm computes while building: not torch.device('meta'))
        return _signature(timm.create_model(name, pretrained=False, num_classes=num_classes, global_pool=global_pool))


@functools.lru_cache(maxsize=None)
def _stock_name(arguments: str) -> str | None:
    kwargs = json.loads(arguments)
    with empty_build('meta'):
        ours = _signature(build_eva('stock-probe', kwargs))
    for name in timm.list_models(f"eva*_patch{kwargs['patch_size']}_*"):  # timm names its EVA models so
        cfg = get_pretrained_cfg(name)
        if cfg is not None and tuple(cfg.input_size[-2:]) == (kwargs['img_size'],) * 2 and \
                _stock_signature(name, kwargs['num_classes'], kwargs['global_pool']) == ours:
            return name
    return None


def stock_timm_name(timm_kwargs: dict[str, Any], num_classes: int, global_pool: str) -> str | None:
    """The stock timm EVA model whose tower is exactly this one, built as open_clip builds it (`num_classes`
    outputs, `global_pool`): the same modules, settings and tensor shapes, found by building both on the meta
    device. None if timm has none."""
    return _stock_name(json.dumps(dict(timm_kwargs, num_classes=num_classes, global_pool=global_pool),
                                  sort_keys=True))
