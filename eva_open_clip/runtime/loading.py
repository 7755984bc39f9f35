"""A model as the tools (classify, embed, export-onnx) load it, from a `ModelChoice` checked where the user's
words entered: a tag's download first, and a file of another architecture said in one line naming both."""
from __future__ import annotations

import os

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg

from eva_open_clip.checkpoint import read_state_dict
from eva_open_clip.convert import detect_model
from eva_open_clip.errors import ToolError, UserError, param, say
from eva_open_clip.hub import cached_file, ensure_downloaded
from eva_open_clip.layout import convert_state_dict
from eva_open_clip.runtime.choice import ModelChoice

_OUT_OF_MEMORY = (torch.cuda.OutOfMemoryError, MemoryError)


def load_model(choice: ModelChoice, device: str, precision: str):
    """(model in eval mode, inference transform, tokenizer) of a checked choice on `device` in `precision` (the
    choice's, resolved), its linear layers int8 where it says so (see `eva_open_clip.quantize`).

    A tag's file is downloaded first (failing at once when the hub cannot be reached). What open_clip
    or timm raise for a file of another architecture is said in one line naming both.
    """
    model_name, pretrained, quantize = choice.model, choice.pretrained, choice.int8
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
    keep_exact_logit_scale(model, choice)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def keep_exact_logit_scale(model: torch.nn.Module, choice: ModelChoice) -> None:
    """The tools' model scales similarities by the file's `logit_scale` in float32 whatever its precision: open_clip
    casts it with the weights (bf16 makes the released 100 a 98.86, every zero-shot probability ~1% less sharp).
    The plugin keeps open_clip's dtypes for open_clip's users; this is the tools' model."""
    scale = getattr(model, 'logit_scale', None)
    if not isinstance(scale, torch.nn.Parameter) or scale.dtype == torch.float32:
        return
    path = choice.pretrained if os.path.isfile(choice.pretrained) else cached_file(choice.model, choice.pretrained)
    exact = convert_state_dict(read_state_dict(path)).get('logit_scale') if path else None
    value = (exact if exact is not None and exact.numel() == scale.numel() else scale.detach())
    model.logit_scale = torch.nn.Parameter(value.reshape(scale.shape).to(scale.device, torch.float32),
                                           requires_grad=scale.requires_grad)


def _fitting_model(path: str) -> str:
    """'; its keys and shapes are those of X: give --model X' for a released-layout file, if one fits."""
    try:
        found = detect_model(read_state_dict(path)) if os.path.isfile(path) else None
    except (UserError, ValueError, KeyError):
        found = None
    if found:
        return f"; its keys and shapes are those of {found}: give {param('model', found)}"
    return (f"; give the {param('model')} it was made for (a custom architecture: "
            + say(python="eva_open_clip.register_eva_model(NAME, 'CONFIG.json')",
                  command_line='--register NAME=CONFIG.json --model NAME') + ')')
