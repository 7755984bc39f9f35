"""A trained model's weights in the released file's layout: the keys, shapes and dtypes of the file the run started
from (BAAI's), so that everything that loads the original (open_clip through this package, the `eva_clip` API,
`classify`, `embed`, `export-onnx`) loads the fine-tuned model the same way."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from eva_open_clip.checkpoint import read_state_dict
from eva_open_clip.durable import write_atomic
from eva_open_clip.errors import UsageError, param
from eva_open_clip.layout import convert_with_origin, is_released_layout


def released_state_dict(state: dict[str, torch.Tensor], template: Mapping[str, torch.Tensor]) \
        -> dict[str, torch.Tensor]:
    """A model's weights (its state dict, emptied key by key: a gathered copy is freed as it is converted) under the
    keys of `template` (a released file's state dict), each in the template's dtype and shape; the fixed rotary
    tables, which no training changes, are the template's."""
    _, origin = convert_with_origin(template)
    ours_of = {released: ours for ours, released in origin.items()}
    out = {}
    for key, value in template.items():
        ours = ours_of.get(key)
        source = value if ours is None else state.pop(ours).detach()
        out[key] = source.to('cpu', value.dtype).reshape(value.shape).clone()
    return out


def template_path(pretrained: str, cached: Path | None) -> str:
    """The released file the run started from (`pretrained`, or its tag's file in the hub cache)."""
    path = pretrained if os.path.isfile(pretrained) else (str(cached) if cached else None)
    if path is None or not is_released_layout(read_state_dict(path)):
        raise UsageError(f"{param('save_released')} writes the layout of the released file "
                         f"the run starts from: {param('pretrained', pretrained)} is not one")
    return path


def save_released(state: dict[str, torch.Tensor], template: str, out: str | os.PathLike) -> Path:
    """Write `out` (whole or not at all) with a model's weights (its state dict, consumed) in the layout of the
    released file `template` (memory-mapped where it can be: only the output is held besides `state`)."""
    weights = released_state_dict(state, read_state_dict(template))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, lambda p: torch.save(weights, p))
    return out
