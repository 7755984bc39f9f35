"""`eva-open-clip embed`: L2-normalized features of images, image-text pairs or text lines (`eva_open_clip.embed`);
its flags are those of `embed.options.EmbedOptions`."""
from __future__ import annotations

import argparse

from eva_open_clip.cli.options import add_model_options
from eva_open_clip.embed.options import add_arguments as add_embed_options

HELP = 'L2-normalized features of images, image-text pairs or text lines'
DESCRIPTION = ('Embed image files, folders (recursively, in path order), --files-from lists and webdataset tar shards '
               '(paths, quoted globs or brace patterns such as "data/{00000..00099}.tar"), in the order given, or the '
               'lines of --text-file. --out FILE.npy writes one array and FILE.paths.txt (row i is line i). --out DIR '
               'writes the clip-retrieval layout (img_emb/, text_emb/ with --captions, metadata/ parquet with '
               'image_path, caption, json fields and the image-text similarity), part by part, resumable: run the '
               'same command again after an interruption. Under torchrun each rank takes its share of the shards. '
               'Samples that cannot be used are skipped and counted, never shifting a row.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_embed_options(parser)
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.embed.api import run_embed
    from eva_open_clip.embed.options import EmbedOptions
    run_embed(EmbedOptions.from_args(args))
    return 0
