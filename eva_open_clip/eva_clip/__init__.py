"""The EVA-CLIP repository's `eva_clip` package API, on this package's models: code written against it (PuLID and
its ComfyUI nodes, LLaVA-style vision towers) runs with only its import changed:

    from eva_open_clip.eva_clip import create_model_and_transforms      # was: from eva_clip import ...
    from eva_open_clip.eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

The names and keyword arguments are the repository's (`create_model`, `create_model_and_transforms`,
`create_model_from_pretrained`, `get_tokenizer`, `tokenize`, `list_models`, `get_model_config`,
`add_model_config`, `load_checkpoint`, `image_transform`); the models are this package's (every released file
loaded exactly, offline once cached, no xformers, apex or deepspeed), with the image tower of
`model.EvaVisionTower`. `pretrained` is a checkpoint path, the repository's tag `eva_clip` (the model's
released file, through the Hugging Face hub cache) or one of this package's tags. `precision` has the
repository's meaning: `fp16` and `bf16` (and the names holding them) cast the whole model. An argument this
package cannot honour is a one-line error, never ignored; an unknown model or weights are `RuntimeError`s,
as the repository raises them.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import open_clip
import torch
from open_clip.tokenizer import tokenize

from eva_open_clip.checkpoint import CheckpointError
from eva_open_clip.errors import ToolError, UsageError
from eva_open_clip.eva_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
from eva_open_clip.eva_clip.model import EvaVisionTower, as_eva_clip_model
from eva_open_clip.registry import get_eva_model, list_eva_models, register_eva_model

__all__ = ['OPENAI_DATASET_MEAN', 'OPENAI_DATASET_STD', 'EvaVisionTower', 'add_model_config', 'create_model',
           'create_model_and_transforms', 'create_model_from_pretrained', 'get_model_config', 'get_tokenizer',
           'image_transform', 'list_models', 'load_checkpoint', 'tokenize']

REPOSITORY_TAG = 'eva_clip'  # the repository's tag for each model's released file


class WeightsError(ToolError):
    """A checkpoint that does not fit the model (a RuntimeError, as loading raises it in the repository)."""


ALIASES = {'EVA-CLIP-8B-plus': 'EVA-CLIP-8B-448'}  # the repository's names of models registered here otherwise
_PRECISIONS = {'fp32': 'fp32', 'amp': 'fp32', 'fp16': 'pure_fp16', 'pure_fp16': 'pure_fp16', 'bf16': 'pure_bf16',
               'pure_bf16': 'pure_bf16', 'amp_bf16': 'pure_bf16', 'amp_bfloat16': 'fp32'}


def _name(model_name: str) -> str:
    """The registered name of a model as the repository names it (`/` for `-`, its aliases); RuntimeError if none."""
    name = ALIASES.get(model_name.replace('/', '-'), model_name.replace('/', '-'))
    if get_eva_model(name) is None:
        raise UsageError(f'Model config for {model_name} not found; the EVA-CLIP models are '
                         f'{", ".join(list_models())} (add_model_config adds one)')
    return name


def _checkpoint(name: str, pretrained: str, cache_dir: Optional[str]) -> str:
    """The file or this package's tag that `pretrained` names (the repository's tag `eva_clip`: the model's released
    file), downloaded into the hub cache first; RuntimeError when there is none."""
    from eva_open_clip.hub import ensure_downloaded
    from eva_open_clip.registry import default_pretrained
    tag = default_pretrained(name) if pretrained == REPOSITORY_TAG else pretrained
    if tag and open_clip.get_pretrained_cfg(name, tag):
        ensure_downloaded(name, tag, cache_dir)
        return tag
    if os.path.isfile(pretrained):
        return pretrained
    tags = ', '.join(open_clip.list_pretrained_tags_by_model(name))
    raise UsageError(f'Pretrained weights ({pretrained}) not found for model {name}: give a checkpoint file, '
                     f'{REPOSITORY_TAG!r} or one of its tags ({tags})')


def _refuse(jit: bool, skip_list: Sequence[str], pretrained_hf: bool = True) -> None:
    if jit:
        raise UsageError('jit=True: TorchScript is not supported for these models; use torch.compile')
    if skip_list:
        raise UsageError(f'skip_list={list(skip_list)!r}: every tensor of a checkpoint is loaded (strictly); load '
                         f'it, then reset what you want')
    if not pretrained_hf:
        raise UsageError('pretrained_hf=False: the EVA-CLIP models have no Hugging Face text tower to leave out')


def _precision(precision: str) -> str:
    if precision not in _PRECISIONS:
        raise UsageError(f"precision={precision!r}: choose from {', '.join(_PRECISIONS)}")
    return _PRECISIONS[precision]


def create_model(model_name: str, pretrained: Optional[str] = None, precision: str = 'fp32',
                 device: Union[str, torch.device] = 'cpu', jit: bool = False, force_quick_gelu: bool = False,
                 force_custom_clip: bool = False, force_patch_dropout: Optional[float] = None,
                 pretrained_image: str = '', pretrained_text: str = '', pretrained_hf: bool = True,
                 pretrained_visual_model: Optional[str] = None, pretrained_text_model: Optional[str] = None,
                 cache_dir: Optional[str] = None, skip_list: Sequence[str] = ()) -> torch.nn.Module:
    """The EVA-CLIP model `model_name` (random weights without `pretrained`), in training mode as the repository
    returns it. `force_custom_clip` changes nothing: these models always have their own text tower.
    `pretrained_image`/`pretrained_text` load one tower from a file or tag (of `pretrained_visual_model` /
    `pretrained_text_model`, this model by default) when `pretrained` is not given."""
    _refuse(jit, skip_list, pretrained_hf)
    name = _name(model_name)
    checkpoint = _checkpoint(name, pretrained, cache_dir) if pretrained else None
    try:
        model = open_clip.create_model(name, pretrained=checkpoint, precision=_precision(precision), device=device,
                                       force_quick_gelu=force_quick_gelu, force_patch_dropout=force_patch_dropout,
                                       cache_dir=cache_dir)
        if not pretrained:
            for tower, source, owner in (('visual', pretrained_image, pretrained_visual_model),
                                         ('text', pretrained_text, pretrained_text_model)):
                if source:
                    _load_tower(model, tower, source, _name(owner) if owner else name, cache_dir)
    except CheckpointError as e:  # a file that does not fit: a RuntimeError, as the repository's loading raises
        raise WeightsError(e.message) from None
    cfg = open_clip.get_pretrained_cfg(name, checkpoint) if checkpoint else {}
    return as_eva_clip_model(model, (cfg or {}).get('mean') or OPENAI_DATASET_MEAN,
                             (cfg or {}).get('std') or OPENAI_DATASET_STD)


def _load_tower(model: torch.nn.Module, tower: str, source: str, owner: str, cache_dir: Optional[str]) -> None:
    """Load one tower of `model` from a file or a tag of `owner` (that model's released file)."""
    from open_clip.pretrained import download_pretrained

    from eva_open_clip.checkpoint import load_tower
    tag = _checkpoint(owner, source, cache_dir)
    cfg = open_clip.get_pretrained_cfg(owner, tag)
    load_tower(model, tower, download_pretrained(cfg, cache_dir=cache_dir) if cfg else tag, part_of_release=True)


def create_model_and_transforms(model_name: str, pretrained: Optional[str] = None, precision: str = 'fp32',
                                device: Union[str, torch.device] = 'cpu', jit: bool = False,
                                force_quick_gelu: bool = False, force_custom_clip: bool = False,
                                force_patch_dropout: Optional[float] = None, pretrained_image: str = '',
                                pretrained_text: str = '', pretrained_hf: bool = True,
                                pretrained_visual_model: Optional[str] = None,
                                pretrained_text_model: Optional[str] = None,
                                image_mean: Optional[tuple[float, ...]] = None,
                                image_std: Optional[tuple[float, ...]] = None, cache_dir: Optional[str] = None,
                                skip_list: Sequence[str] = ()):
    """(model, training transform, inference transform), as the repository's function returns them."""
    model = create_model(model_name, pretrained, precision, device, jit, force_quick_gelu, force_custom_clip,
                         force_patch_dropout, pretrained_image, pretrained_text, pretrained_hf,
                         pretrained_visual_model, pretrained_text_model, cache_dir, skip_list)
    mean, std = image_mean or model.visual.image_mean, image_std or model.visual.image_std
    size = model.visual.image_size
    return model, image_transform(size, True, mean, std), image_transform(size, False, mean, std)


def create_model_from_pretrained(model_name: str, pretrained: str, precision: str = 'fp32',
                                 device: Union[str, torch.device] = 'cpu', jit: bool = False,
                                 force_quick_gelu: bool = False, force_custom_clip: bool = False,
                                 force_patch_dropout: Optional[float] = None, return_transform: bool = True,
                                 image_mean: Optional[tuple[float, ...]] = None,
                                 image_std: Optional[tuple[float, ...]] = None, cache_dir: Optional[str] = None,
                                 is_frozen: bool = False):
    """The model with its weights (and its inference transform, unless `return_transform` is false); `is_frozen`
    turns its gradients off."""
    if not pretrained:
        raise UsageError(f'{pretrained} is not a valid pretrained cfg or checkpoint for {model_name}')
    model = create_model(model_name, pretrained, precision, device, jit, force_quick_gelu, force_custom_clip,
                         force_patch_dropout, cache_dir=cache_dir)
    if is_frozen:
        for parameter in model.parameters():
            parameter.requires_grad = False
    if not return_transform:
        return model
    return model, image_transform(model.visual.image_size, False, image_mean or model.visual.image_mean,
                                  image_std or model.visual.image_std)


def image_transform(image_size: Union[int, tuple[int, int]], is_train: bool,
                    mean: Optional[tuple[float, ...]] = None, std: Optional[tuple[float, ...]] = None):
    """The repository's transform: training, a random resized crop (scale 0.9-1); inference, the short side resized
    (bicubic) and a center crop; both to RGB and normalized (the OpenAI CLIP mean and std by default)."""
    return open_clip.image_transform(image_size, is_train=is_train, mean=mean or OPENAI_DATASET_MEAN,
                                     std=std or OPENAI_DATASET_STD)


def get_tokenizer(model_name: str):
    """The tokenizer of a model: the CLIP BPE `tokenize` (77 tokens, the last one end-of-text when cut)."""
    _name(model_name)
    return tokenize


def list_models() -> list[str]:
    """The EVA-CLIP models (the repository's names where they differ from this package's)."""
    renamed = {ours: theirs for theirs, ours in ALIASES.items()}
    return [renamed.get(name, name) for name in list_eva_models()]


def get_model_config(model_name: str) -> Optional[dict]:
    """The EVA-CLIP config (the repository's format) of a model, or None."""
    name = ALIASES.get(model_name.replace('/', '-'), model_name.replace('/', '-'))
    model = get_eva_model(name)
    return None if model is None else dict(model.spec.original)


def add_model_config(path: Union[str, os.PathLike]) -> None:
    """Register the EVA-CLIP config file `path` (or every `*.json` config in the folder `path`) under its file name."""
    path = Path(path)
    for config in sorted(path.glob('*.json')) if path.is_dir() else [path]:
        register_eva_model(config.stem, config)


def load_checkpoint(model: torch.nn.Module, checkpoint_path: str, model_key: str = 'model|module|state_dict',
                    strict: bool = True):
    """Load a checkpoint (released layout or open_clip's; bare or under `model`, `module` or `state_dict`) into
    `model`; returns the keys a non-strict load skipped, as `load_state_dict` does."""
    from eva_open_clip.checkpoint import load_into
    if model_key != 'model|module|state_dict':
        raise UsageError(f'model_key={model_key!r}: a state dict is found bare or under model, module or state_dict')
    loaded = load_into(model, checkpoint_path, strict=strict)
    return torch.nn.modules.module._IncompatibleKeys(loaded.missing_keys, loaded.unexpected_keys)
