"""`eva-open-clip embed`: L2-normalized features of images, image-text pairs or text lines (`eva_open_clip.embed`)."""
from __future__ import annotations

import argparse

from eva_open_clip.cli.options import add_model_options
from eva_open_clip.embed.defaults import CAPTION_KEY, IMAGE_KEYS, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from eva_open_clip.embed.options import DECODE_MODES, DEFAULT_PART_SIZE

HELP = 'L2-normalized features of images, image-text pairs or text lines'
DESCRIPTION = ('Embed image files, folders (recursively, in path order), --files-from lists and webdataset tar shards '
               '(paths, quoted globs or brace patterns such as "data/{00000..00099}.tar"), in the order given, or the '
               'lines of --text-file. --out FILE.npy writes one array and FILE.paths.txt (row i is line i). --out DIR '
               'writes the clip-retrieval layout (img_emb/, text_emb/ with --captions, metadata/ parquet with '
               'image_path, caption, json fields and the image-text similarity), part by part, resumable: run the '
               'same command again after an interruption. Under torchrun each rank takes its share of the shards. '
               'Samples that cannot be used are skipped and counted, never shifting a row.')


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('inputs', nargs='*', help='image files, folders, .tar shards, globs or brace patterns')
    parser.add_argument('--out', required=True, help='output FILE.npy, or a folder')
    parser.add_argument('--captions', action='store_true', help="also embed each sample's caption (folder output)")
    parser.add_argument('--files-from', default=None, help='a file with one image path per line')
    parser.add_argument('--workers', type=int, default=None,
                        help='DataLoader workers decoding images (default: the available cores, per rank; less two '
                             'on a GPU, for the main process and its pinning thread)')
    parser.add_argument('--batch-size', type=int, default=None, help='(default: 256 on a GPU, 32 on the CPU)')
    parser.add_argument('--decode', default=None, choices=DECODE_MODES,
                        help="exact: open_clip's own preprocessing; fast: JPEGs decoded at reduced scale (never below "
                             "twice the model's size) and resized in torch, a few pixel levels and about 1e-3 of a "
                             'feature away (default: fast on a GPU, exact on the CPU; a resumed folder keeps its own)')
    parser.add_argument('--part-size', type=int, default=DEFAULT_PART_SIZE,
                        help='rows per output part in a folder (default: %(default)s)')
    parser.add_argument('--image-key', default=','.join(IMAGE_KEYS),
                        help='webdataset image keys, comma-separated, first found wins (default: %(default)s)')
    parser.add_argument('--caption-key', default=CAPTION_KEY, help='webdataset caption key (default: %(default)s)')
    parser.add_argument('--text-file', default=None, help='embed the lines of this file instead of images')
    parser.add_argument('--max-image-pixels', type=int, default=MAX_IMAGE_PIXELS,
                        help='skip (reason image_too_large) an image of more pixels, found from its header before '
                             "decoding (default: %(default)s, PIL's decompression-bomb guard)")
    parser.add_argument('--max-resized-pixels', type=int, default=MAX_RESIZED_PIXELS,
                        help="skip (reason image_too_large) an image whose short side resized to the model's "
                             "image size gives more pixels (default: %(default)s: aspect ratios up to about 330:1 "
                             "at 224 px)")
    remote = parser.add_argument_group('remote shards (http(s):// and pipe:COMMAND)')
    remote.add_argument('--stall-timeout', type=float, default=1800.0,
                        help='seconds without a byte after which a read fails (default: %(default)s)')
    remote.add_argument('--retries', type=int, default=5,
                        help='more tries of a read that failed for a reason that may pass (a 503, a cut connection, '
                             'a stall, an error page), 1, 2, 4, ... seconds apart (default: %(default)s)')
    remote.add_argument('--give-up', action='append', default=[], metavar='SHARD',
                        help='give up for good on a shard that cannot be read, as listed (repeatable): recorded with '
                             'no rows in summary.json, so that the job can finish')
    parser.add_argument('--progress-interval', type=float, default=None,
                        help='seconds between progress lines when standard error is not a terminal (default: 30)')
    parser.add_argument('--quiet', action='store_true', help='no progress output (errors and the final line remain)')
    add_model_options(parser)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.embed import embed
    embed(args.inputs, out=args.out, model=args.model, pretrained=args.pretrained, device=args.device,
          precision=args.precision, batch_size=args.batch_size, decode=args.decode, compile=args.compile,
          quantize=args.quantize,
          workers=args.workers, captions=args.captions,
          files_from=args.files_from, text_file=args.text_file, part_size=args.part_size,
          stall_timeout=args.stall_timeout, retries=args.retries, give_up=args.give_up,
          image_keys=args.image_key.split(','), caption_key=args.caption_key, max_image_pixels=args.max_image_pixels,
          max_resized_pixels=args.max_resized_pixels, progress_interval=args.progress_interval, quiet=args.quiet)
    return 0
