"""The `eva-open-clip` command (also `python -m eva_open_clip`): a thin layer over the plugin and the
embedding tool. `main` parses the arguments and reports usage errors before importing any tool module,
and turns every `UserError` into one line and its exit status."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import sys
from pathlib import Path
from typing import Sequence

from eva_open_clip import __version__
from eva_open_clip.cli.checks import (REGISTER_FORM, check_device, check_model, check_pretrained_option, check_template,
                                      register_option)
from eva_open_clip.cli.runner import RUN_DESCRIPTION, RUN_USAGE, run_target, split_run_args
from eva_open_clip.embed.defaults import CAPTION_KEY, IMAGE_KEYS, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from eva_open_clip.embed.progress import plural
from eva_open_clip.embed.ranks import Ranks
from eva_open_clip.errors import UsageError, UserError


def _register(registrations: Sequence[str] | None) -> None:
    """Register each `--register NAME=CONFIG.json` (a ConfigError is exit status 2)."""
    from eva_open_clip.registry import register_eva_model
    for text in registrations or ():
        register_eva_model(*register_option(text))


def _convert(args: argparse.Namespace) -> int:
    from eva_open_clip.checkpoint import CheckpointError, check_file
    from eva_open_clip.export import export_folder
    from eva_open_clip.registry import register_eva_model
    try:
        check_file(args.checkpoint)
    except CheckpointError as e:
        raise UsageError(str(e)) from None
    if args.config:
        if not args.model:
            raise UsageError('--config needs --model NAME to register it under')
        register_eva_model(args.model, args.config)
    if args.model:
        check_model(args.model)
    out = export_folder(args.checkpoint, args.out_dir, model_name=args.model, force=args.force)
    print(f'wrote {out}')
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from eva_open_clip.registry import get_eva_model
    check_model(args.model)
    if get_eva_model(args.model) is None:
        raise UsageError(f'{args.model}: not an EVA-CLIP model (`eva-open-clip models` lists them)')
    args.pretrained = check_pretrained_option(args.model, args.pretrained)
    if args.quantize and args.dtype != 'fp32':
        raise UsageError(f'--quantize {args.quantize} quantizes the fp32 model: drop --dtype {args.dtype}')
    from eva_open_clip.deploy import export_onnx, require_onnx
    from eva_open_clip.durable import check_empty
    check_empty(Path(args.out_dir), args.force)
    require_onnx()
    from eva_open_clip.cli.loading import load_model
    model, _, _ = load_model(args.model, args.pretrained, 'cpu', 'fp32' if args.dtype == 'fp32' else 'pure_fp16')
    out = export_onnx(model, args.model, args.out_dir, quantize=args.quantize, force=args.force)
    kind = f'int8 ({args.dtype} activations)' if args.quantize else args.dtype
    print(f'wrote {out}: {kind} visual/model.onnx and textual/model.onnx with their preprocess and tokenizer '
          f'files (Immich\'s layout)', file=sys.stderr)
    return 0


def _models(args: argparse.Namespace) -> int:
    from eva_open_clip.cli.models_table import format_models, model_rows
    rows = model_rows()
    print(json.dumps(rows, indent=2) if args.json else format_models(rows))
    return 0


PRECISIONS = ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16', 'amp', 'amp_bf16', 'amp_bfloat16')


def _check_model_options(args: argparse.Namespace) -> None:
    """The model options' usage errors, before any tool module is imported or the model loaded."""
    check_model(args.model)
    args.pretrained = check_pretrained_option(args.model, args.pretrained)
    if Ranks.from_env().world_size == 1:  # under torchrun each rank's device is checked once known
        check_device(args.device)


def _encoder(args: argparse.Namespace, device: str | None = None):
    from eva_open_clip.cli.checks import default_device
    from eva_open_clip.cli.cpu_memory import keep_freed_memory
    from eva_open_clip.cli.loading import load_model
    from eva_open_clip.embed.encoder import Encoder
    device = device or args.device or default_device()
    model, preprocess, tokenizer = load_model(args.model, args.pretrained, device, args.precision)
    if device == 'cpu':
        keep_freed_memory()
    return Encoder(model, preprocess, tokenizer, device, args.precision)


def _classify(args: argparse.Namespace) -> int:
    _check_model_options(args)
    check_template(args.template)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError('--top-k must be at least 1')
    from eva_open_clip.cli.classify import BUNDLED_IMAGE, classify, image_files, print_results, read_labels
    labels = read_labels(args.labels, args.labels_file)
    swallowed = [label for label in args.labels or () if os.path.isfile(label)]
    if swallowed and not args.images:  # `--labels cat dog photo.jpg` takes photo.jpg for a label
        raise UsageError(f'--labels took {swallowed[0]}, a file, for a label: give the images before --labels '
                         f'(classify {swallowed[0]} --labels ...)')
    paths = image_files(args.images) if args.images else [BUNDLED_IMAGE]
    results = classify(_encoder(args), paths, labels, template=args.template, top_k=args.top_k)
    print_results(results, args.json)
    return 0


def _embed(args: argparse.Namespace) -> int:
    if not args.inputs and not args.text_file and not args.files_from:
        raise UsageError('give images, folders, tar shards, --files-from LIST or --text-file FILE')
    for name in ('batch_size', 'part_size', 'max_image_pixels', 'max_resized_pixels'):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.workers is not None and args.workers < 0:
        raise UsageError('--workers must be 0 or more')
    npy = args.out.endswith('.npy')
    if npy and Ranks.from_env().world_size > 1:
        raise UsageError('--out FILE.npy is written by one process: under torchrun give --out DIR')
    if npy and args.captions:
        raise UsageError('--captions writes the folder layout: give --out DIR')
    if not npy and args.text_file:
        raise UsageError('--text-file writes one FILE.npy: give --out FILE.npy')
    if args.text_file and (args.inputs or args.files_from):
        raise UsageError('--text-file embeds the lines of one file: give no images, folders or --files-from')
    _check_model_options(args)
    _stop_on_signals()
    if not npy:
        return _embed_folder(args)
    from eva_open_clip.embed.store.npy_file import embed_to_npy, paths_file
    rows, skipped = embed_to_npy(lambda: _encoder(args), args.inputs, args.out, batch_size=args.batch_size,
                                 text_file=args.text_file, files_from=args.files_from, workers=_workers(args),
                                 image_keys=args.image_key.split(','), limits=_limits(args), quiet=args.quiet,
                                 progress_interval=args.progress_interval)
    _warn_skipped(skipped)
    reasons: dict[str, int] = {}
    for skip in skipped:
        reasons[skip.reason] = reasons.get(skip.reason, 0) + 1
    print(f'embedded {plural(rows, "sample")} into {args.out} and {paths_file(Path(args.out))} '
          f'({_skipped(reasons)})', file=sys.stderr)
    return 0


def _skipped(reasons: dict[str, int]) -> str:
    """'none skipped', or '3 skipped: bad_json 1, image_too_large 2'."""
    if not reasons:
        return 'none skipped'
    return f'{sum(reasons.values())} skipped: ' + ', '.join(f'{r} {n}' for r, n in sorted(reasons.items()))


def _limits(args: argparse.Namespace):
    from eva_open_clip.embed.decode import PixelLimits
    return PixelLimits(args.max_image_pixels, args.max_resized_pixels)


def _warn_skipped(skipped: list) -> None:
    if skipped:
        from eva_open_clip.embed.store.names import name_text
        shown = ', '.join(f'{"?" if s.key is None else name_text(s.key)} ({s.reason})' for s in skipped[:20])
        more = f' and {len(skipped) - 20} more' if len(skipped) > 20 else ''
        print(f'warning: skipped {len(skipped)} sample(s): {shown}{more}', file=sys.stderr)


def _workers(args: argparse.Namespace) -> int:
    from eva_open_clip.embed.loader import default_workers
    return default_workers(Ranks.from_env().local_world_size) if args.workers is None else args.workers


class Interrupted(BaseException):
    """SIGTERM or SIGINT: the job stops, leaving its folder resumable."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _stop_on_signals() -> None:
    """SIGTERM (a scheduler's preemption) and SIGINT (Ctrl-C) raise Interrupted; a second one exits at once."""
    def handler(signum: int, _frame) -> None:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, lambda n, _f: os._exit(128 + n))
        raise Interrupted(signum)

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, handler)


def _embed_folder(args: argparse.Namespace) -> int:
    """The folder layout, on one process or on every rank of a torchrun/srun launch."""
    import torch
    import torch.distributed as dist
    from eva_open_clip.cli.checks import rank_device
    from eva_open_clip.embed.job import embed_folder
    from eva_open_clip.embed.store.folder import FolderSettings, done_count
    from eva_open_clip.embed.units import read_units
    ranks = Ranks.from_env()
    device = args.device
    if ranks.world_size > 1:
        device = rank_device(device, ranks.local_rank, ranks.local_world_size, torch.cuda.is_available())
        check_device(device)
        if device and device.startswith('cuda'):
            torch.cuda.set_device(device)
        # the only collective waits for rank 0 to list the inputs, which may take a while on a slow file system
        timeout = datetime.timedelta(seconds=float(os.environ.get('EVA_OPEN_CLIP_START_TIMEOUT_S', 3600)))
        dist.init_process_group('nccl' if device and device.startswith('cuda') else 'gloo', timeout=timeout)
    out = Path(args.out)
    try:
        settings = FolderSettings(
            model=args.model, pretrained=args.pretrained,
            precision=args.precision, part_size=args.part_size, captions=args.captions,
            image_keys=args.image_key.split(','), caption_key=args.caption_key,
            max_image_pixels=args.max_image_pixels, max_resized_pixels=args.max_resized_pixels)
        summary = embed_folder(lambda: _encoder(args, device), settings, args.inputs, args.files_from, out,
                               _workers(args), args.batch_size, ranks, progress_interval=args.progress_interval,
                               quiet=args.quiet)
    except Interrupted as e:
        if ranks.rank == 0:
            units = read_units(out) or []
            print(f'eva-open-clip embed: interrupted after {done_count(out) if units else 0} of '
                  f'{plural(len(units), "unit")}; run the same command to resume', file=sys.stderr)
        return 128 + e.signum
    finally:
        if ranks.world_size > 1:
            dist.destroy_process_group()
    if summary is None:
        return 0
    print(f"embedded {plural(summary.rows, 'sample')} of {plural(summary.units, 'unit')} into {args.out} "
          f"({_skipped(summary.skipped_by_reason)}); this run: "
          f"{plural(sum(r.rows for r in summary.ranks), 'sample')} on {plural(ranks.world_size, 'rank')}"
          f"{_rate(summary.ranks)}", file=sys.stderr)
    unreadable = [u for r in summary.ranks for u in r.unreadable]
    if unreadable:
        print(f"eva-open-clip embed: {plural(len(unreadable), 'shard')} could not be read, e.g. "
              f"{unreadable[0].source}: {unreadable[0].detail}; they are not marked done: run the same command to "
              f"try them again",
              file=sys.stderr)
        return 1
    if summary.rows == 0:
        print('eva-open-clip embed: no sample could be embedded'
              + (f" ({_skipped(summary.skipped_by_reason)}; check --image-key and --caption-key)"
                 if summary.skipped else ''), file=sys.stderr)
        return 1
    return 0


def _rate(ranks: list) -> str:
    """This run's rate, and how much of its time the model waited for decoded images (raise --workers)."""
    rates = [r.images_per_s for r in ranks if r.images_per_s]
    if not rates:
        return ''
    waited = sum(r.input_wait_s for r in ranks) / sum(r.seconds for r in ranks)
    return f', {sum(rates):.4g} img/s after the first batch ({waited:.1%} of it waiting for decoded images)'


def _model_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group('model')
    group.add_argument('--model', default='EVA_CLIP_g_14',
                       help='model name (default: %(default)s; `eva-open-clip models` lists the EVA-CLIP ones)')
    group.add_argument('--pretrained', default=None,
                       help="checkpoint path or pretrained tag (default: the model's hub tag, downloaded once)")
    group.add_argument('--device', default=None, help='torch device (default: cuda when available, else cpu)')
    group.add_argument('--precision', default='fp32', choices=PRECISIONS, help='(default: %(default)s)')
    _register_option(group)


def _register_option(parser) -> None:
    parser.add_argument('--register', action='append', default=None, metavar=REGISTER_FORM,
                        help='register a custom EVA-CLIP config as model NAME (repeatable), e.g. '
                             '--register tiny=tiny.json --model tiny')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='eva-open-clip', description='EVA-CLIP models in open_clip: zero-shot classification, '
                                          'embeddings, export, and running open_clip tools.')
    parser.add_argument('--version', action='version', version=f'%(prog)s {__version__}')
    sub = parser.add_subparsers(dest='command', required=True)

    convert = sub.add_parser('convert', help='export a released checkpoint as a plain open_clip folder',
                             description='Write OUT_DIR/open_clip_config.json and OUT_DIR/open_clip_model.safetensors '
                                         "(the checkpoint's dtype), loadable with open_clip's 'local-dir:OUT_DIR' "
                                         'and pushable to the Hugging Face hub as is.')
    convert.add_argument('checkpoint', help='released checkpoint (.pt/.pth/.bin/.safetensors)')
    convert.add_argument('out_dir', help='folder to write (must not exist or be empty, unless --force)')
    convert.add_argument('--model', default=None, help='registered model name (default: detected from the keys)')
    convert.add_argument('--config', default=None,
                         help='EVA-CLIP config (JSON) of a custom architecture, registered as --model')
    convert.add_argument('--force', action='store_true', help='replace a non-empty OUT_DIR')
    _register_option(convert)
    convert.set_defaults(func=_convert)

    onnx = sub.add_parser(
        'export-onnx', help='export the image and text encoders as ONNX, in the folder layout Immich loads',
        description='Write OUT_DIR/config.json, OUT_DIR/visual/{model.onnx,preprocess_cfg.json} and '
                    'OUT_DIR/textual/{model.onnx,tokenizer.json,tokenizer_config.json}: two ONNX graphs (opset 18, '
                    'dynamic batch) returning L2-normalized float32 embeddings of float32 images normalized as '
                    "open_clip's preprocess does and of int32 token ids, with open_clip's tokenizer for the "
                    "`tokenizers` library. Weights above 2 GB go to model.onnx.data beside each graph. Needs "
                    "pip install 'eva_open_clip[onnx]'.")
    onnx.add_argument('model', help='registered EVA model name (`eva-open-clip models` lists them)')
    onnx.add_argument('out_dir', help='folder to write (must not exist or be empty, unless --force)')
    onnx.add_argument('--pretrained', default=None,
                      help="checkpoint path or pretrained tag (default: the model's hub tag, downloaded once)")
    onnx.add_argument('--dtype', default='fp32', choices=('fp32', 'fp16'),
                      help='weights and compute (inputs and outputs stay float32; default: %(default)s)')
    onnx.add_argument('--quantize', default=None, choices=('int8',),
                      help="ONNX Runtime's dynamic int8 quantization of the MatMul weights (for CPUs)")
    onnx.add_argument('--force', action='store_true', help='replace a non-empty OUT_DIR')
    _register_option(onnx)
    onnx.set_defaults(func=_export_onnx)

    models = sub.add_parser('models', help='list the EVA-CLIP models, their tags and hub files, and what is cached',
                            description='The registered EVA-CLIP models (with --register, custom ones too): name, '
                                        'pretrained tag, parameters, the released file on the Hugging Face hub '
                                        'and its size, and whether that file is in the local hub cache (where a '
                                        "tag's download puts it). Nothing is downloaded.")
    models.add_argument('--json', action='store_true', help='print JSON, with the cached file\'s path')
    _register_option(models)
    models.set_defaults(func=_models)

    classify = sub.add_parser(
        'classify', help='zero-shot classification of images against text labels',
        description='Zero-shot classification: probabilities are softmax(logit_scale.exp() * cosine similarity) '
                    'over the labels. With no arguments, runs the original EVA-CLIP README example: the CLIP '
                    'diagram against "a diagram", "a dog", "a cat".')
    classify.add_argument('images', nargs='*', help='image files or folders (default: the bundled CLIP diagram)')
    classify.add_argument('--labels', nargs='+', default=None, help='candidate labels')
    classify.add_argument('--labels-file', default=None, help='file with one label per line')
    classify.add_argument('--template', default='{}', help="prompt around each label, e.g. 'a photo of a {}.' "
                                                           "(default: the label itself)")
    classify.add_argument('--top-k', type=int, default=None, help='show the k most probable labels (default: all)')
    classify.add_argument('--json', action='store_true', help='print JSON: [{"image", "labels": [{"label", "prob"}]}]')
    _model_options(classify)
    classify.set_defaults(func=_classify)

    embed = sub.add_parser(
        'embed', help='L2-normalized features of images, image-text pairs or text lines',
        description='Embed image files, folders (recursively, in path order), --files-from lists and webdataset '
                    'tar shards (paths, quoted globs or brace patterns such as "data/{00000..00099}.tar"), in the '
                    'order given, or the lines of --text-file. --out FILE.npy writes one array and FILE.paths.txt '
                    '(row i is line i). --out DIR writes the clip-retrieval layout (img_emb/, text_emb/ with '
                    '--captions, metadata/ parquet with image_path, caption, json fields and the image-text '
                    'similarity), part by part, resumable: run the same command again after an interruption. '
                    'Under torchrun each rank takes its share of the shards. Samples that cannot be used are '
                    'skipped and counted, never shifting a row.')
    embed.add_argument('inputs', nargs='*', help='image files, folders, .tar shards, globs or brace patterns')
    embed.add_argument('--out', required=True, help='output FILE.npy, or a folder')
    embed.add_argument('--captions', action='store_true', help='also embed each sample\'s caption (folder output)')
    embed.add_argument('--files-from', default=None, help='a file with one image path per line')
    embed.add_argument('--workers', type=int, default=None,
                       help='DataLoader workers decoding images (default: the available cores, per rank)')
    embed.add_argument('--batch-size', type=int, default=32, help='(default: %(default)s)')
    embed.add_argument('--part-size', type=int, default=100_000,
                       help='rows per output part in a folder (default: %(default)s)')
    embed.add_argument('--image-key', default=','.join(IMAGE_KEYS),
                       help='webdataset image keys, comma-separated, first found wins (default: %(default)s)')
    embed.add_argument('--caption-key', default=CAPTION_KEY, help='webdataset caption key (default: %(default)s)')
    embed.add_argument('--text-file', default=None, help='embed the lines of this file instead of images')
    embed.add_argument('--max-image-pixels', type=int, default=MAX_IMAGE_PIXELS,
                       help='skip (reason image_too_large) an image of more pixels, found from its header before '
                            "decoding (default: %(default)s, PIL's decompression-bomb guard)")
    embed.add_argument('--max-resized-pixels', type=int, default=MAX_RESIZED_PIXELS,
                       help='skip (reason image_too_large) an image whose short side resized to the model\'s '
                            'image size gives more pixels (default: %(default)s: aspect ratios up to about 330:1 '
                            'at 224 px)')
    embed.add_argument('--progress-interval', type=float, default=None,
                       help='seconds between progress lines when standard error is not a terminal (default: 30)')
    embed.add_argument('--quiet', action='store_true', help='no progress output (errors and the final line remain)')
    _model_options(embed)
    embed.set_defaults(func=_embed)

    sub.add_parser('run', help='run a module or script with the EVA models registered', usage=RUN_USAGE,
                   prog='eva-open-clip run', description=RUN_DESCRIPTION, add_help=False)
    return parser


def _run(argv: list[str]) -> int:
    """`eva-open-clip run`: everything after the target belongs to the target, exit status included."""
    if argv in (['-h'], ['--help']):
        argparse.ArgumentParser(prog='eva-open-clip run', usage=RUN_USAGE, description=RUN_DESCRIPTION,
                                add_help=False).print_help()
        return 0
    try:
        registrations, target = split_run_args(argv)
        _register(registrations)
    except UserError as e:
        print(f'eva-open-clip run: {e}', file=sys.stderr)
        return e.exit_code
    run_target(target)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: every UserError becomes one line on standard error and its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == 'run':
        return _run(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        _register(getattr(args, 'register', None))
        return args.func(args)
    except UserError as e:
        print(f'eva-open-clip {args.command}: {e}', file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f'eva-open-clip {args.command}: interrupted', file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:  # Ctrl-C outside embed (which stops its job cleanly on its own)
        print(f'eva-open-clip {args.command}: interrupted', file=sys.stderr)
        return 128 + signal.SIGINT
    except BrokenPipeError:  # the reader of standard output stopped early (`| head`): not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
