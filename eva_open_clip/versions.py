"""What the installed open_clip and timm can do: the one place that knows their versions.

eva_open_clip supports open_clip_torch 2.24 to 4.x (4.x: its main branch, 4.2.0.dev0, tested) and timm 1.0.13
to 1.x (timm before 1.0.13 computes `RmsNorm` from the variance instead of the mean of squares, and its `Eva`
gradient checkpointing passes keyword arguments that torch's reentrant checkpoint refuses). A feature that an older
release lacks raises `UnsupportedVersion`, naming the release that has it, instead of failing deep
inside open_clip or timm. What each release lacks (see also the README):

| feature | open_clip_torch | timm |
| --- | --- | --- |
| `force_image_size` with EVA models | 3.0 (resizes after loading) | 1.0.18 (`Eva.set_input_size`) |
| `create_model(load_weights=...)`, `local-dir:` models | 3.0 | |
| `model.forward_intermediates()` | 2.32 | |
| `model.lock_text_tower()` (open_clip's `TextTransformer.lock`) | 3.1 | |
| SwiGLU without sub-LN (`naiveswiglu` alone, custom configs) | | 1.0.20 (`swiglu_align_to`) |
| open_clip's trainer as `open_clip_train.main` (before: `training.main`) | 2.26 | |

`eva-open-clip train --fsdp` needs torch >= 2.6 (`torch.distributed.fsdp.fully_shard`, FSDP2).
`eva-open-clip export-onnx` needs torch >= 2.6 (its ONNX exporter from `torch.export`, with dynamic
shapes and external data) and the `onnx` extra.
"""
from __future__ import annotations

import functools
import inspect
from importlib import metadata
from typing import Any, Callable

from packaging.version import Version
from timm.models.eva import Eva

from .errors import UserError


class UnsupportedVersion(UserError, RuntimeError):
    """A feature that the installed open_clip or timm release does not have."""


OPEN_CLIP_VERSION = metadata.version('open_clip_torch')  # open_clip < 2.26 has no __version__
TIMM_VERSION = metadata.version('timm')
TORCH_VERSION = metadata.version('torch')
OPEN_CLIP = Version(OPEN_CLIP_VERSION)
TIMM = Version(TIMM_VERSION)
TORCH = Version(TORCH_VERSION)
ONNX_EXPORT_TORCH = (2, 6)
FSDP_TORCH = (2, 6)  # fully_shard public in torch.distributed.fsdp


def at_least(installed: Version, version: tuple[int, ...]) -> bool:
    """Whether `installed` is release `version` or later (a pre-release, such as 3.0.0rc1, is not 3.0)."""
    return installed >= Version(_version_text(version))


def open_clip_at_least(version: tuple[int, ...]) -> bool:
    return at_least(OPEN_CLIP, version)


def timm_at_least(version: tuple[int, ...]) -> bool:
    return at_least(TIMM, version)


def _version_text(version: tuple[int, ...]) -> str:
    return '.'.join(map(str, version))


# torch's DataLoader hands batches over as workers finish them (`in_order=False`) from torch 2.6
DATALOADER_IN_ORDER = at_least(TORCH, (2, 6))
# open_clip's trainer module: shipped as `training` before open_clip_torch 2.26
TRAINER_MODULE = 'open_clip_train.main' if open_clip_at_least((2, 26)) else 'training.main'
# create_model arguments that older open_clip releases lack, with the release that added them
_CREATE_MODEL_ARGS_SINCE = {'load_weights': (3, 0), 'weights_only': (3, 0)}
# timm `Eva` arguments that older timm releases lack
_EVA_ARGS_SINCE = {'swiglu_align_to': (1, 0, 20)}


def require_open_clip(feature: str, version: tuple[int, ...]) -> None:
    """Raise `UnsupportedVersion` unless the installed open_clip is at least `version`."""
    if not open_clip_at_least(version):
        raise UnsupportedVersion(f'{feature} needs open_clip_torch >= {_version_text(version)} '
                                 f'(installed: {OPEN_CLIP_VERSION})')


def require_torch(feature: str, version: tuple[int, ...]) -> None:
    """Raise `UnsupportedVersion` unless the installed torch is at least `version`."""
    if not at_least(TORCH, version):
        raise UnsupportedVersion(f'{feature} needs torch >= {_version_text(version)} (installed: {TORCH_VERSION})')


def require_timm(feature: str, version: tuple[int, ...]) -> None:
    """Raise `UnsupportedVersion` unless the installed timm is at least `version`."""
    if not timm_at_least(version):
        raise UnsupportedVersion(f'{feature} needs timm >= {_version_text(version)} (installed: {TIMM_VERSION})')


def check_create_model_args(known: set[str], arguments: dict[str, Any]) -> None:
    """Name the open_clip release an unknown `create_model` argument needs, if it is a newer one."""
    for key in arguments:
        if key not in known and key in _CREATE_MODEL_ARGS_SINCE:
            require_open_clip(f'create_model({key}=...)', _CREATE_MODEL_ARGS_SINCE[key])
    if arguments.get('force_image_size') is not None:
        require_open_clip('force_image_size with EVA models', (3, 0))
        require_timm('force_image_size with EVA models', (1, 0, 18))


@functools.lru_cache(maxsize=None)
def _eva_parameters() -> frozenset[str]:
    return frozenset(inspect.signature(Eva.__init__).parameters)


def eva_kwargs(kwargs: dict[str, Any], timm_name: str) -> dict[str, Any]:
    """`kwargs` for timm's `Eva`, leaving out settings this timm lacks while they hold their default.

    A setting that changes the model and that this timm lacks is an `UnsupportedVersion` error.
    """
    known = _eva_parameters()
    for key, value in kwargs.items():
        if key not in known and value not in (0, None, False):
            feature = f"the EVA image tower '{timm_name}' ({key}={value!r})"
            if key not in _EVA_ARGS_SINCE:
                raise UnsupportedVersion(f'{feature} needs a timm newer than the installed {TIMM_VERSION}')
            require_timm(feature, _EVA_ARGS_SINCE[key])
    return {k: v for k, v in kwargs.items() if k in known}


def needs_open_clip(feature: str, version: tuple[int, ...]) -> Callable[..., Any]:
    """A stand-in method for a feature this open_clip lacks: calling it says which release has it."""
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        require_open_clip(feature, version)
    method.__name__ = feature
    return method
