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
COLUMNS = ('model', 'tag', 'params', 'hub_file', 'file_size', 'cached')


def _params(name: str) -> str:
    """A custom model's parameter count, from the model built on the meta device (no memory, no weights)."""
    from eva_open_clip.empty_build import meta_model
    count = sum(p.numel() for p in meta_model(name).parameters())
    return f'{count / 1e9:.3g}B' if count >= 1e9 else f'{count / 1e6:.3g}M'


def model_rows() -> list[dict]:
    """One row per model and tag (a custom model without a tag has one row): the `COLUMNS`."""
    released = {r.name: r for r in BUILTIN_MODELS}
    rows = []
    for name in list_eva_models():
        release = released.get(name)
        params = release.params if release else _params(name)
        tags = get_eva_model(name).pretrained or {'': ''}
        for tag, hub_file in tags.items():
            cached = cached_file(name, tag) if tag else None
            rows.append(dict(model=name, tag=tag or None, params=params, hub_file=hub_file or None,
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
