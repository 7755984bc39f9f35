"""Building a model without allocating its parameters, then filling them from a checkpoint.

When a checkpoint will set every weight, random initialization is wasted work, and building the
model in fp32 before casting it can need more memory than the machine has (EVA-CLIP-8B: 33 GB in
fp32, 16.4 GB in bf16). Inside `empty_build(device)`, every parameter a module registers is put on
the meta device (no memory; initializers do nothing there). Buffers (the fixed tables: causal mask,
rotary tables, zero key bias) are computed as usual and remembered, since open_clip may move the
model before the checkpoint is loaded. `fill_tensor` then creates each parameter directly on its
final device, in its final dtype, from the checkpoint tensor, and `restore_buffers` puts the
remembered buffers back.

Only `nn.Module.register_parameter` and `register_buffer` are wrapped, and only while a build is
under way; in every other thread or context they behave as torch's own.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from . import quantize
from .cpu_memory import return_freed


@dataclass
class _Build:
    device: torch.device
    quantize: str | None = None
    constructing: bool = True
    buffers: dict[tuple[nn.Module, str], torch.Tensor] = field(default_factory=dict)


_BUILD: contextvars.ContextVar[_Build | None] = contextvars.ContextVar('eva_open_clip_build', default=None)
_LOCK = threading.Lock()
_ACTIVE = 0
_REGISTER_PARAMETER = nn.Module.register_parameter
_REGISTER_BUFFER = nn.Module.register_buffer


def _constructing() -> _Build | None:
    build = _BUILD.get()
    return build if build is not None and build.constructing else None


def _register_parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
    if param is not None and not param.is_meta and _constructing() is not None:
        param = nn.Parameter(param.to('meta'), requires_grad=param.requires_grad)
    _REGISTER_PARAMETER(self, name, param)


def _register_buffer(self: nn.Module, name: str, tensor: torch.Tensor | None, persistent: bool = True) -> None:
    _REGISTER_BUFFER(self, name, tensor, persistent)
    build = _constructing()
    if build is not None and tensor is not None and not tensor.is_meta:  # not a move's re-registration
        build.buffers[(self, name)] = tensor


@contextlib.contextmanager
def empty_build(device: str | torch.device, quantize: str | None = None) -> Iterator[None]:
    """Within this block, modules are built with parameters on the meta device, to be filled on `device` (the
    linear layers' matrices as int8 with `quantize='int8'`: see `quantize`)."""
    global _ACTIVE
    token = _BUILD.set(_Build(torch.device(device), quantize))
    with _LOCK:
        _ACTIVE += 1
        nn.Module.register_parameter, nn.Module.register_buffer = _register_parameter, _register_buffer
    try:
        yield
    finally:
        _BUILD.reset(token)
        with _LOCK:
            _ACTIVE -= 1
            if not _ACTIVE:
                nn.Module.register_parameter, nn.Module.register_buffer = _REGISTER_PARAMETER, _REGISTER_BUFFER


def end_construction() -> None:
    """The model is built: parameters registered from now on (a checkpoint's) are real."""
    build = _BUILD.get()
    if build is not None:
        build.constructing = False


def fill_tensor(module: nn.Module, key: str, value: torch.Tensor) -> None:
    """Set parameter or buffer `key` of `module` to `value`, cast to its dtype, without a second copy.

    An empty (meta) entry is created on the build's device (a linear layer's matrix quantized at once, when
    the build quantizes); a real one is copied into in place.
    """
    path, _, name = key.rpartition('.')
    owner = module.get_submodule(path) if path else module
    target = getattr(owner, name)
    if not target.is_meta:
        target.copy_(value)
        return
    build = _BUILD.get()
    device = build.device if build is not None else torch.device('cpu')
    tensor = torch.empty(target.shape, dtype=target.dtype, device=device).copy_(value)
    if build is not None and build.quantize and quantize.quantizable(owner, name):
        setattr(owner, name, quantize.int8_weight(tensor))
        del tensor  # the full-precision matrix, whose memory glibc would keep between the int8 ones
        if device.type == 'cpu':
            return_freed()
        return
    setattr(owner, name, nn.Parameter(tensor, requires_grad=target.requires_grad)
            if isinstance(target, nn.Parameter) else tensor)


def restore_buffers() -> None:
    """Put the buffers computed while building back on the build's device, where a move left them empty."""
    build = _BUILD.get()
    if build is None:
        return
    for (owner, name), value in build.buffers.items():
        current = getattr(owner, name, None)
        if isinstance(current, torch.Tensor) and current.is_meta:
            setattr(owner, name, value.to(build.device, dtype=current.dtype))


def check_filled(module: nn.Module) -> None:
    """Raise if any parameter or buffer of `module` is still empty (meta)."""
    empty = [k for k, v in module.state_dict(keep_vars=True).items() if v.is_meta]
    empty += [k for k, v in module.named_buffers() if v.is_meta]
    if empty:
        raise RuntimeError(f'eva_open_clip: {len(empty)} tensor(s) were left unfilled, e.g. {empty[0]!r}')


def meta_model(name: str, **kwargs) -> nn.Module:
    """An open_clip model with every tensor on the meta device: shapes and dtypes only, no memory.

    Unlike building under `torch.device('meta')`, constructors still compute on the CPU (older timm
    releases read values while building, e.g. drop-path rates).
    """
    import open_clip
    root = logging.getLogger()
    root.addFilter(_no_random_init_warning)  # open_clip's "initialized randomly": a meta model holds no values
    try:
        with empty_build('meta'):
            return open_clip.create_model(name, device='meta', **kwargs)
    finally:
        root.removeFilter(_no_random_init_warning)


def _no_random_init_warning(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith('No pretrained weights loaded')
