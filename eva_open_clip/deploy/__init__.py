"""Serving without PyTorch: a model's image and text encoders as ONNX graphs, with open_clip's tokenizer
for the `tokenizers` library, in the folder layout Immich loads (`eva-open-clip export-onnx`).

Needs the `onnx` extra (`pip install 'eva_open_clip[onnx]'`); nothing here is imported by the plugin.
"""
from eva_open_clip.deploy.folder import check_export, export_onnx, export_released, require_onnx

__all__ = ['check_export', 'export_onnx', 'export_released', 'require_onnx']
