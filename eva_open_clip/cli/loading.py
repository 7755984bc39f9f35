"""Loading a model for the command line by tag or path: the download first, and a file of another
architecture said in one line naming both."""
from __future__ import annotations

import os

import open_clip
from open_clip.pretrained import get_pretrained_cfg

from eva_open_clip.cli.checks import check_model, check_pretrained_option
from eva_open_clip.errors import ToolError, UserError
from eva_open_clip.hub import ensure_downloaded


def load_model(model_name: str, pretrained: str | None, device: str, precision: str):
    """(model in eval mode, inference transform, tokenizer) for a registered model and a tag or path.

    A tag's file is downloaded first (failing at once when the hub cannot be reached). What open_clip
    or timm raise for a file of another architecture is said in one line naming both.
    """
    check_model(model_name)
    pretrained = check_pretrained_option(model_name, pretrained)
    if get_pretrained_cfg(model_name, pretrained):
        ensure_downloaded(model_name, pretrained)
    try:
        model, preprocess = open_clip.create_model_from_pretrained(
            model_name, pretrained=pretrained, device=device, precision=precision)
    except UserError:
        raise
    except (AssertionError, KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if 'out of memory' in first.lower():
            raise ToolError(f'out of memory loading {model_name} on {device} ({first}): try --precision bf16, '
                            f'or a machine with more memory') from None
        raise ToolError(f'--pretrained {pretrained} does not fit --model {model_name} ({type(e).__name__}: '
                        f'{first}){_fitting_model(pretrained)}') from None
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
        return f'; its keys and shapes are those of {found}: give --model {found}'
    return '; give the --model it was made for (a custom architecture: --register NAME=CONFIG.json --model NAME)'
