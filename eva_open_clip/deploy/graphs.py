"""The two ONNX graphs of a model, image encoder and text encoder, each returning the L2-normalized
embedding (float32) for a dynamic batch, exported with torch's `torch.export`-based exporter.

- image: input `image`, float32 `[batch, 3, size, size]`, normalized as open_clip's preprocess does;
- text: input `text`, int32 `[batch, context_length]` token ids (int64 too: the graph casts).

An fp16 export keeps these float32 inputs and outputs (it casts inside), so a client feeds both alike.
A graph is refused when it holds an op that serving stacks reject or that makes shapes depend on data
(`ScatterND`, which TensorRT failed on in the original EVA code's rotary embedding, `NonZero`, control
flow); `onnx.checker` runs with full checks on every graph written.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import warnings
from pathlib import Path

import torch

from eva_open_clip.durable import new_file_mode
from eva_open_clip.errors import ToolError

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024 ** 3  # a model file above it keeps its weights as external data
FORBIDDEN_OPS = frozenset({'ScatterND', 'ScatterElements', 'NonZero', 'Loop', 'If', 'Unique'})


class ImageEncoder(torch.nn.Module):
    """`image` (float32) -> the normalized image embedding (float32)."""

    def __init__(self, model: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.visual, self.dtype = model.visual, dtype

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        features = self.visual(image.to(self.dtype))
        return torch.nn.functional.normalize(features, dim=-1).float()


class TextEncoder(torch.nn.Module):
    """`text` (token ids) -> the normalized text embedding (float32)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.text = model.text  # EVA models are open_clip CustomTextCLIP models

    def forward(self, text: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.text(text.long()), dim=-1).float()


def export_graph(encoder: torch.nn.Module, example: torch.Tensor, input_name: str, output_name: str,
                 path: Path, external_data_threshold: int = PROTOBUF_LIMIT) -> None:
    """Write `encoder` as `path` (ONNX, dynamic batch); its weights go to `path.data` when they pass
    `external_data_threshold` bytes. Refuses (ToolError) a graph with a FORBIDDEN_OPS op."""
    weights = sum(t.numel() * t.element_size() for t in encoder.state_dict().values())
    with warnings.catch_warnings(), torch.no_grad(), _quiet('onnxscript'):
        warnings.simplefilter('ignore')  # the exporter's notes on what it decomposed and folded
        program = torch.onnx.export(
            encoder, (example,), None, input_names=[input_name], output_names=[output_name],
            opset_version=OPSET, dynamo=True, verbose=False,
            dynamic_shapes={input_name: {0: torch.export.Dim('batch', min=1)}})
    program.save(str(path), external_data=weights > external_data_threshold)
    del program
    check_graph(path)


@contextlib.contextmanager
def _quiet(name: str):
    """Only errors from logger `name` (the ONNX optimizer logs each constant it did not fold)."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def op_counts(path: Path) -> collections.Counter:
    """How many nodes of each op type the graph at `path` has (its weights are not loaded)."""
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return collections.Counter(node.op_type for node in model.graph.node)


def check_graph(path: Path) -> None:
    """`onnx.checker` with full checks (shape inference included), and no FORBIDDEN_OPS op."""
    import onnx
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)
    except onnx.checker.ValidationError as e:
        raise ToolError(f'the exported {path} fails onnx.checker: {str(e).splitlines()[0]}') from None
    forbidden = sorted(set(op_counts(path)) & FORBIDDEN_OPS)
    if forbidden:
        raise ToolError(f'the exported {path} holds {", ".join(forbidden)}, which serving stacks reject')


def quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of the MatMul weights of `source`, written as `target`
    (activations are quantized per batch at run time; the rest stays float32)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    external = source.with_name(source.name + '.data').exists()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        quantize_dynamic(source, target, op_types_to_quantize=['MatMul'], weight_type=QuantType.QInt8,
                         use_external_data_format=external)
    for written in (target, target.with_name(target.name + '.data')):  # its data file comes as 0600
        if written.exists():
            os.chmod(written, new_file_mode())
    check_graph(target)
