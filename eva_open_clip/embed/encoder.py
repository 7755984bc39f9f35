"""Encoding batches with one model: L2-normalized float32 features of images and texts, on its device.

On a GPU the encoder never waits for the CPU (`encoded`): the next batch is copied from pinned memory on a
side stream while the current one is encoded, and features are copied back without blocking, collected one
batch later. With `compile`, the image and text encoders are compiled whole (`torch.compile`,
`fullgraph=True`) and every batch is padded to the batch size, so that a unit's short last batch runs the
same compiled graph instead of compiling another.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import open_clip
import torch
from PIL import Image

from eva_open_clip.embed.pixels import Pixels
from eva_open_clip.errors import ToolError, param

_AUTOCAST = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}


@dataclass
class _Launched:
    """Features on their way back from the device: `host` is theirs once `done` (a CUDA event) has happened."""

    host: torch.Tensor
    rows: int
    done: torch.cuda.Event | None = None

    def result(self) -> np.ndarray:
        if self.done is not None:
            self.done.synchronize()
        return self.host[:self.rows].numpy()


class Encoder:
    """Encodes images and texts into L2-normalized float32 features with one model."""

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, device: str, precision: str,
                 compile: bool = False, batch_size: int | None = None):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.precision = device, precision
        self.input_dtype = open_clip.get_input_dtype(precision)
        self.pixels = Pixels(preprocess)  # how prepared images become the model's input, on the device
        self.batch_size = batch_size if compile else None  # compiled graphs take batches of one size
        cuda = self.device_type == 'cuda'
        if cuda and precision == 'fp32':  # TF32 tensor cores for fp32's matrix products (about 1e-3 relative)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        self._copies = torch.cuda.Stream(device) if cuda else None
        self._image, self._text = model.encode_image, getattr(model, 'encode_text', None)
        if compile:
            self._image = torch.compile(self._image, fullgraph=True, dynamic=False)
            self._text = torch.compile(self._text, fullgraph=True, dynamic=False)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    def _autocast(self):
        amp = _AUTOCAST.get(self.precision)
        return torch.autocast(self.device_type, dtype=amp) if amp else contextlib.nullcontext()

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """`batch` on the device: from pinned memory on the copy stream, which the compute stream then waits for."""
        if self._copies is None:
            return batch.to(self.device)
        with torch.cuda.stream(self._copies):
            moved = batch.to(self.device, non_blocking=batch.is_pinned())
        torch.cuda.current_stream(self.device).wait_stream(self._copies)
        moved.record_stream(torch.cuda.current_stream(self.device))
        return moved

    def _padded(self, batch: torch.Tensor) -> torch.Tensor:
        if self.batch_size is None or len(batch) >= self.batch_size:
            return batch
        return torch.cat([batch, batch.new_zeros((self.batch_size - len(batch), *batch.shape[1:]))])

    @torch.no_grad()
    def _launch(self, batch: torch.Tensor, encode: Callable, prepare: Callable) -> _Launched:
        """Start encoding `batch` (the features come back by `result()`, without blocking on a GPU)."""
        rows = len(batch)
        with self._autocast(), self._out_of_memory(rows):
            features = encode(prepare(self._to_device(self._padded(batch))), normalize=True).float()
        if self._copies is None:
            return _Launched(features.cpu(), rows)
        host = torch.empty(features.shape, dtype=features.dtype, pin_memory=True)
        host.copy_(features, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return _Launched(host, rows, done)

    def launch_pixels(self, pixels: torch.Tensor) -> _Launched:
        return self._launch(pixels, self._image, lambda x: self.pixels.to_model(x, self.input_dtype))

    def launch_tokens(self, tokens: torch.Tensor) -> _Launched:
        return self._launch(tokens, self._text, lambda x: x)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a batch of prepared images (see `Pixels`)."""
        return torch.from_numpy(self.launch_pixels(pixels).result())

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.launch_tokens(tokens).result())

    def encoded(self, batches: Iterable) -> Iterator[tuple[object, np.ndarray | None, np.ndarray | None]]:
        """(batch, image features, text features) of each batch (with `pixels` and `tokens`), in order; on a GPU
        a batch's features are collected once the next batch is on its way."""
        pending = None
        for batch in batches:
            image = self.launch_pixels(batch.pixels) if batch.pixels is not None else None
            text = self.launch_tokens(batch.tokens) if image is not None and batch.tokens is not None else None
            if pending is not None:
                yield self._collected(pending)
            pending = (batch, image, text)
        if pending is not None:
            yield self._collected(pending)

    @staticmethod
    def _collected(launched: tuple) -> tuple[object, np.ndarray | None, np.ndarray | None]:
        batch, image, text = launched
        return batch, None if image is None else image.result(), None if text is None else text.result()

    @contextlib.contextmanager
    def _out_of_memory(self, batch: int) -> Iterator[None]:
        """A GPU out of memory is said in one line, with the usual remedy (an output folder resumes)."""
        try:
            yield
        except torch.cuda.OutOfMemoryError:
            raise ToolError(f"{self.device} ran out of memory on a batch of {batch}: give a smaller "
                            f"{param('batch_size')} (an output folder resumes where it stopped), or "
                            f"{param('precision', 'bf16')}") from None

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))

    def logit_scale(self) -> float:
        return self.model.logit_scale.detach().exp().item()


def load_encoder(model_name: str, pretrained: str | None, device: str | None, precision: str,
                 compile: bool = False, batch_size: int | None = None, quantize: str | None = None) -> Encoder:
    """The encoder of a registered model and a tag or file (see `loading.load_model`), on `device` (the default
    device when None)."""
    from eva_open_clip.cpu_memory import keep_freed_memory
    from eva_open_clip.embed.devices import default_device
    from eva_open_clip.loading import load_model
    device = device or default_device()
    model, preprocess, tokenizer = load_model(model_name, pretrained, device, precision, quantize)
    if device == 'cpu':
        keep_freed_memory()
    return Encoder(model, preprocess, tokenizer, device, precision, compile, batch_size)
