"""`export-onnx`'s output: a model folder in the layout Immich's machine-learning service loads (the
layout of its `immich-app/*` Hugging Face repositories), whole or not at all.

    OUT/config.json                    open_clip's model config (Immich reads `text_cfg`)
    OUT/visual/model.onnx              image encoder (+ model.onnx.data: its weights, above 2 GB)
    OUT/visual/preprocess_cfg.json     size, mean, std, interpolation, resize_mode, as open_clip's preprocess
    OUT/textual/model.onnx             text encoder (+ model.onnx.data)
    OUT/textual/tokenizer.json         open_clip's tokenizer for the `tokenizers` library
    OUT/textual/tokenizer_config.json  its pad token and context length
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import open_clip
import torch

from eva_open_clip.convert import model_config
from eva_open_clip.deploy.graphs import PROTOBUF_LIMIT, ImageEncoder, TextEncoder, export_graph, quantize_int8
from eva_open_clip.deploy.tokenizer import build_tokenizer, tokenizer_config
from eva_open_clip.durable import check_empty, write_folder
from eva_open_clip.errors import UsageError, param
from eva_open_clip.quantize import refuse as refuse_quantized
from eva_open_clip.registry import require_eva_model
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.loading import load_model
from eva_open_clip.versions import ONNX_EXPORT_TORCH, require_torch

CONFIG = 'config.json'
VISUAL, TEXTUAL = 'visual', 'textual'
MODEL = 'model.onnx'
PREPROCESS = 'preprocess_cfg.json'
TOKENIZER, TOKENIZER_CONFIG = 'tokenizer.json', 'tokenizer_config.json'
EXTRA = ('onnx', 'onnxruntime', 'onnxscript', 'tokenizers')
QUANTIZATIONS = ('int8',)


def require_onnx() -> None:
    """UsageError naming what to install, unless the `onnx` extra and a recent enough torch are there."""
    missing = [name for name in EXTRA if importlib.util.find_spec(name) is None]
    if missing:
        raise UsageError(f"export-onnx needs {', '.join(missing)}: pip install 'eva_open_clip[onnx]'")
    require_torch('export-onnx', ONNX_EXPORT_TORCH)


def check_export(out_dir: str | os.PathLike, dtype: str = 'fp32', quantize: str | None = None,
                 force: bool = False) -> None:
    """What an export needs, checked before a model is loaded: the quantization, an output folder that may be
    written, the onnx extra."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise UsageError(f"{param('quantize', quantize)}: choose from {', '.join(QUANTIZATIONS)}")
    if quantize and dtype != 'fp32':
        raise UsageError(f"{param('quantize', quantize)} quantizes the fp32 model: drop {param('dtype', dtype)}")
    check_empty(Path(out_dir), force)
    require_onnx()


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2) + '\n'


def export_released(model_name: str, out_dir: str | os.PathLike, *, pretrained: str | None = None,
                    dtype: str = 'fp32', quantize: str | None = None, force: bool = False) -> Path:
    """Write `out_dir` (see the module docstring) for a registered EVA model and a tag or checkpoint file
    (its hub tag when not given), in `dtype` ('fp32' or 'fp16'); every argument is checked before the
    model is loaded."""
    precision = 'fp32' if dtype == 'fp32' else 'pure_fp16'
    choice = ModelChoice.checked(model_name, pretrained, 'cpu', precision)
    require_eva_model(model_name)
    check_export(out_dir, dtype, quantize, force)
    model, _, _ = load_model(choice, 'cpu', precision)
    return _write(model, model_name, Path(out_dir), quantize, force, PROTOBUF_LIMIT)


def export_onnx(model: torch.nn.Module, model_name: str, out_dir: str | os.PathLike, *,
                quantize: str | None = None, force: bool = False,
                external_data_threshold: int = PROTOBUF_LIMIT) -> Path:
    """Write `out_dir` (see the module docstring) with the ONNX encoders of `model`, an open_clip EVA
    model of the registered `model_name`, in the dtype of its weights (float32 or float16).

    `quantize='int8'` writes ONNX Runtime's dynamic int8 quantization of a float32 model instead.
    Weights above `external_data_threshold` bytes go to `model.onnx.data` beside each graph. An existing
    non-empty `out_dir` is replaced only with `force`.
    """
    refuse_quantized(model, 'export-onnx')
    dtype = next(model.visual.parameters()).dtype
    check_export(out_dir, {torch.float32: 'fp32', torch.float16: 'fp16'}.get(dtype, str(dtype)), quantize, force)
    return _write(model, model_name, Path(out_dir), quantize, force, external_data_threshold)


def _write(model: torch.nn.Module, model_name: str, out_dir: Path, quantize: str | None, force: bool,
           external_data_threshold: int) -> Path:
    dtype = next(model.visual.parameters()).dtype
    tokenizer = open_clip.get_tokenizer(model_name)
    if not hasattr(tokenizer, 'bpe_ranks'):
        raise UsageError(f"{model_name}'s tokenizer is not open_clip's CLIP tokenizer: export-onnx cannot write it")
    config = model_config(model_name)
    context_length = config['text_cfg'].get('context_length', 77)
    preprocess = dict(model.visual.preprocess_cfg)
    height, width = preprocess['size'] if isinstance(preprocess['size'], (tuple, list)) else (preprocess['size'],) * 2
    model = model.eval()
    exported = f'float32.{MODEL}' if quantize else MODEL  # quantized from a float32 graph beside it

    def fill(out: Path) -> None:
        (out / CONFIG).write_text(_json_text(config), encoding='utf-8')
        for part in (VISUAL, TEXTUAL):
            (out / part).mkdir()
        export_graph(ImageEncoder(model, dtype), torch.zeros(2, 3, height, width), 'image', 'image_embedding',
                     out / VISUAL / exported, external_data_threshold)
        (out / VISUAL / PREPROCESS).write_text(_json_text(preprocess), encoding='utf-8')
        export_graph(TextEncoder(model), tokenizer(['a photo', 'a diagram']).int(), 'text', 'text_embedding',
                     out / TEXTUAL / exported, external_data_threshold)
        build_tokenizer(tokenizer, context_length).save(str(out / TEXTUAL / TOKENIZER))
        (out / TEXTUAL / TOKENIZER_CONFIG).write_text(_json_text(tokenizer_config(context_length)), encoding='utf-8')
        if quantize:
            for part in (VISUAL, TEXTUAL):
                source = out / part / exported
                quantize_int8(source, out / part / MODEL)
                for leftover in (source, source.with_name(source.name + '.data')):
                    leftover.unlink(missing_ok=True)

    return write_folder(out_dir, fill, force)
