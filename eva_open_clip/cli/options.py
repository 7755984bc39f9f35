"""The options several commands share: the model options and `--register NAME=CONFIG.json`."""
from __future__ import annotations

import argparse
from typing import Sequence

from eva_open_clip.errors import UsageError
from eva_open_clip.runtime.choice import DEFAULT_MODEL, PRECISIONS, QUANTIZE_CHOICES

REGISTER_FORM = 'NAME=CONFIG.json'
PRECISION_HELP = ('weights and compute (default: bf16 on a GPU with bf16 tensor cores, fp16 on older ones such as '
                  'V100 and T4, either moving a feature by about 1e-3 relative; fp32 elsewhere; give fp32 for full '
                  'precision, with TF32 matrix products on a GPU)')


def register_option(text: str) -> tuple[str, str]:
    """(name, config path) of a `--register NAME=CONFIG.json` value."""
    name, sep, config = text.partition('=')
    if not (sep and name and config):
        raise UsageError(f'--register takes {REGISTER_FORM}, got {text!r}')
    return name, config


def register(registrations: Sequence[str] | None) -> None:
    """Register each `--register NAME=CONFIG.json` (a ConfigError is exit status 2)."""
    from eva_open_clip.registry import register_eva_model
    for text in registrations or ():
        register_eva_model(*register_option(text))


def add_register_option(parser) -> None:
    parser.add_argument('--register', action='append', default=None, metavar=REGISTER_FORM,
                        help='register a custom EVA-CLIP config as model NAME (repeatable), e.g. '
                             '--register tiny=tiny.json --model tiny')


def add_model_options(parser: argparse.ArgumentParser, precision_help: str = PRECISION_HELP,
                      precisions: Sequence[str] = PRECISIONS, inference: bool = True) -> None:
    """The model's options (a `ModelChoice`'s): int8 weights and compiling only for the inference tools."""
    group = parser.add_argument_group('model')
    group.add_argument('--model', default=DEFAULT_MODEL,
                       help='model name (default: %(default)s; `eva-open-clip models` lists the EVA-CLIP ones)')
    group.add_argument('--pretrained', default=None,
                       help="checkpoint path or pretrained tag (default: the model's hub tag, downloaded once)")
    group.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    group.add_argument('--precision', default=None, choices=precisions, help=precision_help)
    if inference:
        group.add_argument('--quantize', default=None, choices=QUANTIZE_CHOICES,
                           help="int8: the linear layers' weights as int8 (torchao; half of bf16's memory, within "
                                'about 1e-3 of the features), for inference (default: none; a resumed folder keeps '
                                'its own)')
        group.add_argument('--compile', action='store_true',
                           help='compile the encoders with torch.compile (fullgraph; one graph for every batch, the '
                                'last padded): faster on a GPU after a minute of compiling')
    add_register_option(group)
