"""Export a released EVA-CLIP checkpoint as a plain open_clip model folder (hub layout).

The folder holds `open_clip_config.json` (model and preprocessing config) and
`open_clip_model.safetensors` (open_clip key names, the checkpoint's dtype). For architectures that
stock timm names (all released EVA-CLIP models), the config refers to that timm model, so
`open_clip.create_model_and_transforms('local-dir:FOLDER')` works without eva_open_clip.
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import open_clip
import torch
from safetensors.torch import save_file

from .checkpoint import CheckpointError, check_file, read_state_dict
from .durable import check_empty, write_atomic, write_folder, write_text
from .empty_build import meta_model
from .errors import UsageError, param
from .layout import convert_state_dict
from .registry import check_model, get_eva_model, list_eva_models, require_eva_model

CONFIG_NAME = 'open_clip_config.json'
WEIGHTS_NAME = 'open_clip_model.safetensors'
_PRECISION = {torch.float16: 'pure_fp16', torch.bfloat16: 'pure_bf16', torch.float32: 'fp32'}


@functools.lru_cache(maxsize=None)
def _shapes_of(name: str, config: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    model = meta_model(name)
    return tuple((k, tuple(v.shape)) for k, v in model.state_dict().items())


def _expected_shapes(name: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """Every tensor's key and shape in the registered model `name` (cached per config: a name may be registered
    again with another one)."""
    return _shapes_of(name, json.dumps(get_eva_model(name).spec.original, sort_keys=True))


def detect_model(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The registered EVA model whose keys and shapes the checkpoint has exactly, if any."""
    converted = {k: tuple(v.shape) for k, v in convert_state_dict(state_dict).items()}
    for name in list_eva_models():
        if converted == dict(_expected_shapes(name)):
            return name
    return None


def _dtype_of(state_dict: dict[str, torch.Tensor]) -> torch.dtype:
    counts = Counter(v.dtype for v in state_dict.values() if v.is_floating_point())
    return counts.most_common(1)[0][0] if counts else torch.float32


def export_folder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, model_name: str | None = None,
                  force: bool = False) -> Path:
    """Write `out_dir` with the open_clip config and safetensors weights of a released checkpoint.

    The checkpoint is loaded strictly into the model first (same checks as open_clip loading). An
    existing non-empty `out_dir` is only replaced with `force`; the folder appears complete or not at all.
    """
    out = Path(out_dir)
    try:
        check_file(checkpoint)
    except CheckpointError as e:  # the file to convert is an input: a usage error
        raise UsageError(e.message) from None
    if model_name is not None:
        check_model(model_name)
        require_eva_model(model_name)
    check_empty(out, force)
    state_dict = read_state_dict(checkpoint)
    name = model_name or detect_model(state_dict)
    if name is None:
        raise CheckpointError(checkpoint, 'matches no registered EVA model; name one with '
                                          f"{param('model_name', flag='model')} "
                                          f'(registered: {", ".join(list_eva_models())})')
    dtype = _dtype_of(state_dict)
    del state_dict
    model = open_clip.create_model(name, pretrained=str(checkpoint), precision=_PRECISION.get(dtype, 'fp32'))
    config = {'model_cfg': model_config(name), 'preprocess_cfg': dict(model.visual.preprocess_cfg)}
    weights = {k: v.contiguous() for k, v in model.state_dict().items()}
    del model

    def fill(folder: Path) -> None:
        write_text(folder / CONFIG_NAME, json.dumps(config, indent=2) + '\n')
        write_atomic(folder / WEIGHTS_NAME, lambda p: save_file(weights, str(p), metadata={'format': 'pt'}))
        weights.clear()

    return write_folder(out, fill, force)


def model_config(name: str) -> dict:
    """open_clip's model config of a registered EVA model, naming the stock timm model where there is one
    (so that open_clip builds it without eva_open_clip)."""
    eva = get_eva_model(name)
    config = json.loads(json.dumps(eva.spec.open_clip_cfg))
    stock = eva.spec.stock_timm_name()
    if stock:
        config['vision_cfg']['timm_model_name'] = stock
    return config
