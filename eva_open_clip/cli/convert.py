"""`eva-open-clip convert`: a released checkpoint as a plain open_clip folder."""
from __future__ import annotations

import argparse

from eva_open_clip.cli.options import add_register_option
from eva_open_clip.errors import UsageError

HELP = 'export a released checkpoint as a plain open_clip folder'
DESCRIPTION = ("Write OUT_DIR/open_clip_config.json and OUT_DIR/open_clip_model.safetensors (the checkpoint's dtype), "
               "loadable with open_clip's 'local-dir:OUT_DIR' and pushable to the Hugging Face hub as is.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('checkpoint', help='released checkpoint (.pt/.pth/.bin/.safetensors)')
    parser.add_argument('out_dir', help='folder to write (must not exist or be empty, unless --force)')
    parser.add_argument('--model', default=None, help='registered model name (default: detected from the keys)')
    parser.add_argument('--config', default=None,
                        help='EVA-CLIP config (JSON) of a custom architecture, registered as --model')
    parser.add_argument('--force', action='store_true', help='replace a non-empty OUT_DIR')
    add_register_option(parser)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.convert import export_folder
    from eva_open_clip.registry import register_eva_model
    if args.config:
        if not args.model:
            raise UsageError('--config needs --model NAME to register it under')
        register_eva_model(args.model, args.config)
    print(f'wrote {export_folder(args.checkpoint, args.out_dir, model_name=args.model, force=args.force)}')
    return 0
