"""A model by name and tag or path, as the tools (classify, embed, export-onnx) load it: the name and the tag
or file checked before anything is loaded, a tag's download first, and a file of another architecture said
in one line naming both."""
from __future__ import annotations

import os

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg, list_pretrained_tags_by_model

from eva_open_clip.checkpoint import CheckpointError
from eva_open_clip.errors import ToolError, UsageError, UserError, did_you_mean, param, say
from eva_open_clip.hub import ensure_downloaded
from eva_open_clip.open_clip_seam import check_pretrained
from eva_open_clip.quantize import check as check_quantize


def check_model(name: str) -> None:
    """An unknown model name is refused, naming the closest registered names and where to find them."""
    if name in open_clip.list_models():
        return
    where = say(python='eva_open_clip.list_eva_models() lists the EVA-CLIP models; a custom config: '
                       f"eva_open_clip.register_eva_model('{name}', 'CONFIG.json')",
                command_line=f'`eva-open-clip models` lists the EVA-CLIP models; a custom config: '
                             f'--register {name}=CONFIG.json')
    raise UsageError(f"{param('model', name)}: no such model{did_you_mean(name, open_clip.list_models())} ({where})")


def default_pretrained(model_name: str) -> str | None:
    """The model's first pretrained tag (the released weights on the hub), if it has one."""
    tags = list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else None


def resolve_pretrained(model_name: str, pretrained: str | None) -> str:
    """The tag or file `pretrained` names (the model's hub tag when not given), checked to exist."""
    pretrained = pretrained or default_pretrained(model_name)
    if not pretrained:
        raise UsageError(f"{param('model', model_name)} has no pretrained tag: pass "
                         f"{param('pretrained', '/path/to/checkpoint')}")
    try:
        check_pretrained(model_name, pretrained)
    except CheckpointError as e:
        raise UsageError(f"{param('pretrained', e.path)}: {e.problem}") from None
    return pretrained


_OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


def load_model(model_name: str, pretrained: str | None, device: str, precision: str, quantize: str | None = None):
    """(model in eval mode, inference transform, tokenizer) for a registered model and a tag or path, its linear
    layers int8 with `quantize='int8'` (see `eva_open_clip.quantize`).

    A tag's file is downloaded first (failing at once when the hub cannot be reached). What open_clip
    or timm raise for a file of another architecture is said in one line naming both.
    """
    check_model(model_name)
    pretrained = resolve_pretrained(model_name, pretrained)
    check_quantize(quantize)
    if get_pretrained_cfg(model_name, pretrained):
        ensure_downloaded(model_name, pretrained)
    try:
        model, preprocess = open_clip.create_model_from_pretrained(
            model_name, pretrained=pretrained, device=device, precision=precision,
            **({'quantize': quantize} if quantize else {}))
    except UserError:
        raise
    except (AssertionError, KeyError, RuntimeError, ValueError, TypeError, MemoryError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if isinstance(e, _OUT_OF_MEMORY):
            raise ToolError(f'out of memory loading {model_name} on {device} ({first}): try '
                            f"{param('precision', 'bf16')}, or a machine with more memory") from None
        raise ToolError(f"{param('pretrained', pretrained)} does not fit {param('model', model_name)} "
                        f'({type(e).__name__}: {first}){_fitting_model(pretrained)}') from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def _fitting_model(path: str) -> str:
    """'; its keys and shapes are those of X: give --model X' for a released-layout file, if one fits."""
    from eva_open_clip.checkpoint import read_state_dict
    from eva_open_clip.export import detect_model
    try:
        found = detect_model(read_state_dict(path)) if os.path.isfile(path) else None
    except (UserError, ValueError, KeyError):
        found = None
    if found:
        return f"; its keys and shapes are those of {found}: give {param('model', found)}"
    return (f"; give the {param('model')} it was made for (a custom architecture: "
            + say(python="eva_open_clip.register_eva_model(NAME, 'CONFIG.json')",
                  command_line='--register NAME=CONFIG.json --model NAME') + ')')
