"""The command line's checks of its model options, made before any tool module is imported or any work done.

Each check raises a `UsageError` (exit status 2) naming the option as the user typed it and what to do.
They need only what importing the package has already imported (open_clip, torch).
"""
from __future__ import annotations

import open_clip
import torch
from open_clip.pretrained import list_pretrained_tags_by_model

from eva_open_clip.checkpoint import CheckpointError
from eva_open_clip.errors import UsageError, did_you_mean
from eva_open_clip.open_clip_seam import check_pretrained

REGISTER_FORM = 'NAME=CONFIG.json'


def register_option(text: str) -> tuple[str, str]:
    """(name, config path) of a `--register NAME=CONFIG.json` value."""
    name, sep, config = text.partition('=')
    if not (sep and name and config):
        raise UsageError(f'--register takes {REGISTER_FORM}, got {text!r}')
    return name, config


def check_model(name: str) -> None:
    """An unknown `--model` names the closest registered names and where to find them."""
    if name in open_clip.list_models():
        return
    raise UsageError(f"--model {name}: no such model{did_you_mean(name, open_clip.list_models())} "
                     f"(`eva-open-clip models` lists the EVA-CLIP models; a custom config: "
                     f"--register {name}=CONFIG.json)")


def default_pretrained(model_name: str) -> str | None:
    """The model's first pretrained tag (the released weights on the hub), if it has one."""
    tags = list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else None


def check_pretrained_option(model_name: str, pretrained: str | None) -> str:
    """The tag or file `--pretrained` names (the model's hub tag when not given), checked to exist."""
    pretrained = pretrained or default_pretrained(model_name)
    if not pretrained:
        raise UsageError(f"--model {model_name} has no pretrained tag: pass --pretrained /path/to/checkpoint")
    try:
        check_pretrained(model_name, pretrained)
    except CheckpointError as e:
        raise UsageError(f'--pretrained {e}') from None
    return pretrained


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def check_device(device: str | None) -> None:
    """A `--device` that torch cannot use here is refused, saying why."""
    if device is None:
        return
    try:
        kind = torch.device(device)
    except RuntimeError:
        raise UsageError(f'--device {device}: not a torch device; give cpu, cuda, cuda:N or mps') from None
    if kind.type == 'cpu':
        return
    if kind.type == 'cuda':
        if not torch.cuda.is_available():
            why = (f'this torch ({torch.__version__}) is built without CUDA' if torch.version.cuda is None
                   else 'torch finds no CUDA GPU or driver on this machine')
            raise UsageError(f'--device {device}: {why}; give --device cpu')
        count = torch.cuda.device_count()
        if kind.index is not None and kind.index >= count:
            raise UsageError(f'--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}')
        return
    if kind.type == 'mps':
        if not torch.backends.mps.is_available():
            raise UsageError(f'--device {device}: MPS is not available on this machine; give --device cpu')
        return
    raise UsageError(f'--device {device}: this tool runs on cpu, cuda, cuda:N or mps')


def rank_device(device: str | None, local_rank: int, local_world_size: int, cuda: bool) -> str | None:
    """The device of one torchrun rank: `cuda` (or none given, with CUDA present) means cuda:LOCAL_RANK."""
    if device is None:
        return f'cuda:{local_rank}' if cuda else None
    if device == 'cuda':
        return f'cuda:{local_rank}'
    if device.startswith('cuda:') and local_world_size > 1:
        raise UsageError(f'--device {device} would put all {local_world_size} ranks of this node on one GPU: '
                         f'give --device cuda (each rank takes cuda:LOCAL_RANK)')
    return device


def check_template(template: str) -> None:
    """A `--template` holds one `{}` where the label goes, and no other braces."""
    try:
        filled = template.format('LABEL')
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or 'LABEL' not in filled:
        raise UsageError(f"--template {template!r}: write '{{}}' where the label goes (e.g. 'a photo of a {{}}.'); "
                         f"a literal brace is written twice ('{{{{' or '}}}}')")
