"""`eva-open-clip models`: the registered EVA-CLIP models, their tags and hub files, and what is cached."""
from __future__ import annotations

import argparse
import json

from eva_open_clip.cli.options import add_register_option
from eva_open_clip.hub import cached_file
from eva_open_clip.registry import BUILTIN_MODELS, get_eva_model, list_eva_models

HELP = 'list the EVA-CLIP models, their tags and hub files, and what is cached'
DESCRIPTION = ('The registered EVA-CLIP models (with --register, custom ones too): name, pretrained tag, parameters, '
               'the released file on the Hugging Face hub and its size, and whether that file is in the local hub '
               "cache (where a tag's download puts it). Nothing is downloaded.")
COLUMNS = ('model', 'tag', 'params', 'bf16', 'int8', 'hub_file', 'file_size', 'cached')


def _sizes(name: str) -> tuple[str, float, float]:
    """A custom model's parameter count and its weights' GB in bf16 and int8, from the model built on the meta
    device (no memory, no weights)."""
    from eva_open_clip.empty_build import meta_model
    from eva_open_clip.quantize import weight_bytes
    model = meta_model(name)
    count = sum(p.numel() for p in model.parameters())
    params = f'{count / 1e9:.3g}B' if count >= 1e9 else f'{count / 1e6:.3g}M'
    return params, round(weight_bytes(model) / 1e9, 2), round(weight_bytes(model, 'int8') / 1e9, 2)


def model_rows() -> list[dict]:
    """One row per model and tag (a custom model without a tag has one row): the `COLUMNS` (`bf16` and `int8`:
    the weights' memory)."""
    released = {r.name: r for r in BUILTIN_MODELS}
    rows = []
    for name in list_eva_models():
        release = released.get(name)
        params, bf16, int8 = (release.params, release.bf16_gb, release.int8_gb) if release else _sizes(name)
        tags = get_eva_model(name).pretrained or {'': ''}
        for tag, hub_file in tags.items():
            cached = cached_file(name, tag) if tag else None
            rows.append(dict(model=name, tag=tag or None, params=params, bf16=f'{bf16:g} GB', int8=f'{int8:g} GB',
                             hub_file=hub_file or None,
                             file_size=release.file_size if release and release.tag == tag else None,
                             cached=None if cached is None else str(cached)))
    return rows


def format_models(rows: list[dict]) -> str:
    """A plain table, and how to use a name."""
    shown = [{**r, 'cached': 'yes' if r['cached'] else 'no' if r['tag'] else None} for r in rows]
    cells = [[('' if r[c] is None else str(r[c])) for c in COLUMNS] for r in shown]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(COLUMNS)]
    lines = ['  '.join(text.ljust(w) for text, w in zip(row, widths)).rstrip() for row in [list(COLUMNS), *cells]]
    lines.append('')
    lines.append('bf16, int8: the memory of the weights in bf16, and with int8 linear layers (--quantize int8); '
                 'activations come on top.')
    lines.append('Use a name with --model NAME (the tag downloads its file once, or give --pretrained FILE); '
                 'a custom config: --register NAME=CONFIG.json --model NAME.')
    return '\n'.join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--json', action='store_true', help="print JSON, with the cached file's path")
    add_register_option(parser)


def run(args: argparse.Namespace) -> int:
    rows = model_rows()
    print(json.dumps(rows, indent=2) if args.json else format_models(rows))
    return 0
