"""The EVA image tower: timm's `Eva`, registered with timm under one name per EVA model.

open_clip builds timm image towers by name (`vision_cfg.timm_model_name`), so every registered EVA
model gets a timm entry point here that builds `Eva` with the arguments of its config.

When a checkpoint is about to overwrite every weight (see `checkpoint_will_fill`), the tower is built
without random initialization: parameters are allocated empty and only the fixed, non-persistent
buffers (zero key bias, rotary tables) are computed.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Callable, Iterator

import torch
from timm.models import build_model_with_cfg, is_model, register_model
from timm.models.eva import Eva

_FILL_PENDING = contextvars.ContextVar('eva_open_clip_fill_pending', default=False)
_ENTRYPOINTS: dict[str, Callable[..., Eva]] = {}


@contextlib.contextmanager
def checkpoint_will_fill() -> Iterator[None]:
    """Within this block, EVA towers are built uninitialized: a checkpoint will set every weight."""
    token = _FILL_PENDING.set(True)
    try:
        yield
    finally:
        _FILL_PENDING.reset(token)


def _init_fixed_buffers(model: torch.nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, 'init_non_persistent_buffers'):
            module.init_non_persistent_buffers()


def build_eva(timm_name: str, kwargs: dict[str, Any]) -> Eva:
    """Build the timm `Eva` trunk, skipping random initialization inside `checkpoint_will_fill`."""
    cfg = dict(architecture=timm_name, num_classes=kwargs.get('num_classes', 0),
               input_size=(3,) + tuple(2 * [kwargs['img_size']]), mean=None, std=None)
    if not _FILL_PENDING.get():
        return build_model_with_cfg(Eva, timm_name, pretrained=False, pretrained_cfg=cfg, **kwargs)
    model = build_model_with_cfg(Eva, timm_name, pretrained=False, pretrained_cfg=cfg, device='meta', **kwargs)
    model.to_empty(device='cpu')
    _init_fixed_buffers(model)
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
