"""`eva-open-clip export-onnx`: the image and text encoders as ONNX, in the folder layout Immich loads."""
from __future__ import annotations

import argparse
import sys

from eva_open_clip.cli.options import add_register_option

HELP = 'export the image and text encoders as ONNX, in the folder layout Immich loads'
DESCRIPTION = ('Write OUT_DIR/config.json, OUT_DIR/visual/{model.onnx,preprocess_cfg.json} and '
               'OUT_DIR/textual/{model.onnx,tokenizer.json,tokenizer_config.json}: two ONNX graphs (opset 18, '
               'dynamic batch) returning L2-normalized float32 embeddings of float32 images normalized as '
               "open_clip's preprocess does and of int32 token ids, with open_clip's tokenizer for the "
               '`tokenizers` library. Weights above 2 GB go to model.onnx.data beside each graph. Needs '
               "pip install 'eva_open_clip[onnx]'.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('model', help='registered EVA model name (`eva-open-clip models` lists them)')
    parser.add_argument('out_dir', help='folder to write (must not exist or be empty, unless --force)')
    parser.add_argument('--pretrained', default=None,
                        help="checkpoint path or pretrained tag (default: the model's hub tag, downloaded once)")
    parser.add_argument('--dtype', default='fp32', choices=('fp32', 'fp16'),
                        help='weights and compute (inputs and outputs stay float32; default: %(default)s)')
    parser.add_argument('--quantize', default=None, choices=('int8',),
                        help="ONNX Runtime's dynamic int8 quantization of the graphs' MatMul weights, for CPUs (here "
                             "--quantize means ONNX Runtime's int8, not the torchao int8 weights it means for "
                             'classify and embed)')
    parser.add_argument('--force', action='store_true', help='replace a non-empty OUT_DIR')
    add_register_option(parser)


def run(args: argparse.Namespace) -> int:
    from eva_open_clip.deploy import export_released
    out = export_released(args.model, args.out_dir, pretrained=args.pretrained, dtype=args.dtype,
                          quantize=args.quantize, force=args.force)
    kind = f'int8 ({args.dtype} activations)' if args.quantize else args.dtype
    print(f"wrote {out}: {kind} visual/model.onnx and textual/model.onnx with their preprocess and tokenizer "
          f"files (Immich's layout)", file=sys.stderr)
    return 0
