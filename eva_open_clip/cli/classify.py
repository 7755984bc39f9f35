"""`eva-open-clip classify`: zero-shot classification of images against text labels."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Sequence

from eva_open_clip.cli.options import add_model_options
from eva_open_clip.errors import UsageError

HELP = 'zero-shot classification of images against text labels'
DESCRIPTION = ('Zero-shot classification: probabilities are softmax(logit_scale.exp() * cosine similarity) over the '
               'labels. With no arguments, runs the original EVA-CLIP README example: the CLIP diagram against '
               '"a diagram", "a dog", "a cat".')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='*', help='image files or folders (default: the bundled CLIP diagram)')
    parser.add_argument('--labels', nargs='+', default=None, help='candidate labels')
    parser.add_argument('--labels-file', default=None, help='file with one label per line')
    parser.add_argument('--template', default='{}', help="prompt around each label, e.g. 'a photo of a {}.' "
                                                         "(default: the label itself)")
    parser.add_argument('--top-k', type=int, default=None, help='show the k most probable labels (default: all)')
    parser.add_argument('--json', action='store_true', help='print JSON: [{"image", "labels": [{"label", "prob"}]}]')
    add_model_options(parser)


def read_labels(labels: Sequence[str] | None, labels_file: str | None) -> list[str] | None:
    """Labels from the command line and/or a file (one per line); None for the original example's."""
    found = list(labels or [])
    if labels_file:
        try:
            text = Path(labels_file).read_text(encoding='utf-8')
        except OSError as e:
            raise UsageError(f'--labels-file {labels_file}: {e.strerror or e}') from None
        except UnicodeDecodeError:
            raise UsageError(f'--labels-file {labels_file}: not UTF-8 text') from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    if not found and labels is None and labels_file is None:
        return None
    if not found:
        raise UsageError(f'--labels-file {labels_file}: holds no label' if labels_file else 'no labels given')
    return found


def format_table(results: list[dict]) -> str:
    """One small table per image."""
    blocks = []
    for result in results:
        width = max(len(entry['label']) for entry in result['labels'])
        rows = [f"  {entry['label']:<{width}}  {entry['prob']:7.2%}" for entry in result['labels']]
        blocks.append('\n'.join([result['image'], *rows]))
    return '\n\n'.join(blocks)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.classify import README_LABELS, classify
    labels = read_labels(args.labels, args.labels_file)
    swallowed = [label for label in args.labels or () if os.path.isfile(label)]
    if swallowed and not args.images:  # `--labels cat dog photo.jpg` takes photo.jpg for a label
        raise UsageError(f'--labels took {swallowed[0]}, a file, for a label: give the images before --labels '
                         f'(classify {swallowed[0]} --labels ...)')
    results = classify(args.images, labels or README_LABELS, model=args.model, pretrained=args.pretrained,
                       device=args.device, precision=args.precision, template=args.template, top_k=args.top_k,
                       compile=args.compile, quantize=None if args.quantize == 'none' else args.quantize)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0
