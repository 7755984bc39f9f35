"""The one place where eva_open_clip reaches into another library's internals (open_clip's, and torch's DDP for
open_clip's trainer).

open_clip has no plugin interface for a model family that needs its own checkpoint layout, so this
module uses four of its internals (1-4), lets torch's DDP take what open_clip_train passes on the CPU (5), adds
stand-ins for two methods older releases lack (6) and answers one hook of open_clip's next trainer (7); nothing
else in the package patches another library:

1. `open_clip.factory._MODEL_CONFIGS`: the model-config registry behind `list_models()`,
   `create_model()` and `get_tokenizer()`. `add_model_config()` inserts our translated configs
   (open_clip's public `add_model_config` only takes files in its own format).
2. `open_clip.pretrained._PRETRAINED`: the tag registry behind `list_pretrained()` and tag resolution.
3. `open_clip.factory.load_checkpoint`: wrapped so that models of this package load checkpoints in
   the released EVA-CLIP layout, strictly and with errors that name the user's keys.
   Other models go to open_clip's own function unchanged.
4. `open_clip.factory.create_model`: wrapped so that, when a checkpoint will be loaded into an EVA
   model, the model is built empty (`empty_build`: no memory, no random initialization) and open_clip
   is told to place it on the meta device; open_clip casts it there to the requested precision, and
   the checkpoint's tensors are then created straight on the requested device in their final dtype.
   Every supported open_clip (2.24 to 4.x) applies device and precision before loading a checkpoint.
   The wrapper also takes this package's keyword `quantize='int8'` (see `quantize`), which reaches it
   through `create_model_and_transforms` and `create_model_from_pretrained` as a model keyword.
5. `torch.nn.parallel.DistributedDataParallel`, for `eva-open-clip run` only (`accept_cpu_device_ids_in_ddp`):
   open_clip_train passes `device_ids=[cpu]` when it trains on the CPU, which torch refuses.
6. Methods that older open_clip releases lack, called on EVA models, get a stand-in that names the
   release they need: `CustomTextCLIP.forward_intermediates` (open_clip < 2.32) and
   `TextTransformer.lock`, which `lock_text_tower` calls (open_clip < 3.1).
7. `fsdp_shard_modules()`, the method open_clip's next trainer (main branch, 4.x: `TrainingTask.prepare_fsdp`)
   looks for on a model to choose what `fully_shard` wraps: open_clip's `CLIP` and `CustomTextCLIP` get a property
   that, on an EVA model, gives the method naming its image and text blocks (`sharding`), and on any other model is
   what the class had (none: `hasattr` is False, as before). A property, not an attribute of each model: a bound
   method stored on the model would tie it in a reference cycle, freed only by the garbage collector.

Which open_clip releases have which features is known in `versions.py`; the wrappers pass open_clip
only the arguments its installed release knows.

`tests/plugin/test_open_clip_seam.py` checks that each of these is still where this module expects it, so
an open_clip upgrade that moves one fails loudly.
"""
from __future__ import annotations

import functools
import inspect
import os
from typing import Any, Callable

import open_clip
import open_clip.factory as oc_factory
import open_clip.pretrained as oc_pretrained
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from timm.models.eva import Eva
from torch.nn.modules.module import _IncompatibleKeys

from . import checkpoint, empty_build, quantize, sharding, versions
from .errors import UsageError, did_you_mean, param
from .tower import is_eva_tower_name

_WRAPPED = '__eva_open_clip_wrapped__'


def has_model_config(name: str) -> bool:
    return name in oc_factory._MODEL_CONFIGS


def add_model_config(name: str, cfg: dict[str, Any]) -> None:
    """Insert an open_clip model config under `name` (kept across open_clip's rescans)."""
    oc_factory._MODEL_CONFIGS[name] = cfg


def remove_model(name: str) -> None:
    """Remove model `name`'s config and pretrained tags from open_clip's registries."""
    oc_factory._MODEL_CONFIGS.pop(name, None)
    oc_pretrained._PRETRAINED.pop(name, None)


def add_pretrained_tag(name: str, tag: str, hub_file: str) -> None:
    """Register `tag` for model `name`, resolving to `hub_file` ('org/repo/file') on the HF hub."""
    oc_pretrained._PRETRAINED.setdefault(name, {})[tag] = dict(
        url='', hf_hub=hub_file, mean=OPENAI_DATASET_MEAN, std=OPENAI_DATASET_STD,
        interpolation='bicubic', resize_mode='shortest', quick_gelu=False)


def check_pretrained(name: str, pretrained: str) -> None:
    """Raise `CheckpointError` unless `pretrained` is a tag of model `name` or a checkpoint file, saying which
    tags there are (and the closest) for a misspelled tag."""
    if oc_pretrained.get_pretrained_cfg(name, pretrained):
        return
    if not os.path.lexists(pretrained):
        tags = oc_pretrained.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else 'it has no pretrained tags'
        raise checkpoint.CheckpointError(pretrained, f'no such file, nor a pretrained tag of {name} '
                                                     f'({known}){did_you_mean(pretrained, tags)}')
    checkpoint.check_file(pretrained)  # a path: say what is wrong with it in plain words


def is_eva_model(model: Any) -> bool:
    """True for open_clip models whose image tower was registered by this package."""
    trunk = getattr(getattr(model, 'visual', None), 'trunk', None)
    if not isinstance(trunk, Eva):
        return False
    cfg = getattr(trunk, 'pretrained_cfg', None) or {}
    return is_eva_tower_name(cfg.get('architecture', ''))


def _load_checkpoint(original: Callable[..., Any]) -> Callable[..., Any]:
    known = set(inspect.signature(original).parameters)

    @functools.wraps(original)
    def load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu'):
        if not is_eva_model(model):
            options = dict(strict=strict, weights_only=weights_only, device=device)
            return original(model, checkpoint_path, **{k: v for k, v in options.items() if k in known})
        empty_build.end_construction()
        loaded = checkpoint.load_into(model, checkpoint_path, strict=strict, weights_only=weights_only)
        return _IncompatibleKeys(loaded.missing_keys, loaded.unexpected_keys)  # what open_clip's version returns
    return load_checkpoint


def is_eva_model_name(name: str) -> bool:
    """True for an open_clip model name whose config builds this package's image tower."""
    cfg = oc_factory._MODEL_CONFIGS.get(name) or {}
    return is_eva_tower_name(str(cfg.get('vision_cfg', {}).get('timm_model_name', '')))


def _create_model(original: Callable[..., Any]) -> Callable[..., Any]:
    signature = inspect.signature(original)

    @functools.wraps(original)
    def create_model(*args: Any, **kwargs: Any):
        name = str(args[0] if args else kwargs.get('model_name', '')).replace('/', '-')  # as open_clip looks it up
        int8 = kwargs.pop('quantize', None)  # this package's keyword (see `quantize`)
        if not is_eva_model_name(name):
            if int8 is not None:
                raise UsageError(f"{param('quantize', int8)}: {name} is not an EVA-CLIP model; quantize is for those")
            return original(*args, **kwargs)
        quantize.check(int8)
        versions.check_create_model_args(set(signature.parameters), kwargs)
        bound = signature.bind_partial(*args, **kwargs)
        arguments = bound.arguments
        if not (arguments.get('pretrained') and arguments.get('load_weights', True)):
            model = original(*args, **kwargs)
            if int8:
                quantize.quantize_model(model)
        else:
            check_pretrained(name, str(arguments['pretrained']))
            device = arguments.get('device', 'cpu')
            arguments['device'] = 'meta'  # open_clip places and casts the empty model; loading fills it on `device`
            with empty_build.empty_build(device, int8):
                model = original(*bound.args, **bound.kwargs)
            if int8:
                quantize.mark(model)
        return model
    return create_model


class _CpuDeviceIdsDDP(torch.nn.parallel.DistributedDataParallel):
    """DDP that accepts `device_ids=[cpu]`, as open_clip_train passes when training on CPU.

    torch only allows `device_ids=None` for CPU modules; open_clip_train's `main` always passes the
    training device, so its CPU (gloo) distributed path fails without this. GPU use is unchanged.
    """

    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
            device_ids, output_device = None, None
        super().__init__(module, device_ids, output_device, *args, **kwargs)


def accept_cpu_device_ids_in_ddp() -> None:
    """Let open_clip_train's CPU (gloo) distributed path run: torch's DDP in this process takes `device_ids=[cpu]`."""
    torch.nn.parallel.DistributedDataParallel = _CpuDeviceIdsDDP


class _ShardModules:
    """`model.fsdp_shard_modules`: on an EVA model, the method naming its blocks; on another, the class's own."""

    def __init__(self, original: Any):
        self.original = original

    def __get__(self, model: Any, owner: type | None = None) -> Any:
        if model is None:
            return self
        if is_eva_model(model):
            return functools.partial(sharding.shard_modules, model)
        if self.original is None:
            raise AttributeError('fsdp_shard_modules')
        return self.original.__get__(model, owner)


def install() -> None:
    """Wrap open_clip's `create_model` and `load_checkpoint`; EVA models' `fsdp_shard_modules` (idempotent)."""
    from open_clip.model import CLIP, CustomTextCLIP
    from open_clip.transformer import TextTransformer
    for cls in (CLIP, CustomTextCLIP):
        if not isinstance(cls.__dict__.get('fsdp_shard_modules'), _ShardModules):
            cls.fsdp_shard_modules = _ShardModules(cls.__dict__.get('fsdp_shard_modules'))
    for cls, method, feature, version in ((CustomTextCLIP, 'forward_intermediates', 'forward_intermediates', (2, 32)),
                                          (TextTransformer, 'lock', 'lock_text_tower', (3, 1))):
        if not hasattr(cls, method):
            setattr(cls, method, versions.needs_open_clip(feature, version))
    for attr, wrapper in (('load_checkpoint', _load_checkpoint), ('create_model', _create_model)):
        current = getattr(oc_factory, attr)
        if getattr(current, _WRAPPED, False):
            continue
        wrapped = wrapper(current)
        setattr(wrapped, _WRAPPED, True)
        setattr(oc_factory, attr, wrapped)
        if getattr(open_clip, attr, None) is current:
            setattr(open_clip, attr, wrapped)
