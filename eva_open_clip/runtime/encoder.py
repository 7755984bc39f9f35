"""Encoding batches with one model: L2-normalized float32 features of images and texts, on its device.

An `Encoder` holds both halves of the pixel pipeline (`pixels`): its `prepare`, which a job hands to its decoding
workers, and its device half, run here. Features are normalized in float32 whatever the model's precision (a
bf16 normalization leaves rows up to ~3e-3 off unit norm).

On a GPU the encoder never waits for the CPU (`encoded`): the next batch is copied from pinned memory on a
side stream while the current one is encoded, and features are copied back into a small ring of pinned
buffers without blocking, collected one batch later (and copied out, so that no result holds page-locked
memory). Every CUDA call names the encoder's device and its streams, so an encoder on `cuda:1` is right
whichever device is current. fp32 on a GPU runs its matrix products on TF32 tensor cores inside the encoder's
calls only; the process's own settings are restored after each. With `compile`, the image and text encoders
are compiled whole (`torch.compile`, `fullgraph=True`) and every batch is padded on the device to the batch
size, so that a unit's short last batch runs the same compiled graph.
"""
from __future__ import annotations

import contextlib
import traceback
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image

from eva_open_clip.errors import ToolError, param
from eva_open_clip.runtime.choice import ModelChoice
from eva_open_clip.runtime.devices import autocast
from eva_open_clip.runtime.pixels import Pixels


class PinnedRing:
    """Page-locked host buffers for features coming back from a GPU, reused: a buffer goes back to the ring once
    its rows are copied out, so the page-locked memory stays at the few batches in flight."""

    def __init__(self):
        self.free: dict[tuple, list[torch.Tensor]] = {}
        self.made = 0  # buffers allocated, for the tests

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        free = self.free.get((tuple(shape), dtype))
        if free:
            return free.pop()
        self.made += 1
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def give_back(self, buffer: torch.Tensor) -> None:
        self.free.setdefault((tuple(buffer.shape), buffer.dtype), []).append(buffer)


@dataclass
class Launched:
    """Features on their way back from the device: `host` holds them once `done` (a CUDA event recorded on the
    encoder's compute stream) has happened; `result()` copies them out and returns `host` to its ring."""

    host: torch.Tensor
    rows: int
    done: torch.cuda.Event | None = None
    ring: PinnedRing | None = None

    def result(self) -> np.ndarray:
        if self.done is None:
            return self.host[:self.rows].numpy()
        self.done.synchronize()
        rows = self.host[:self.rows].numpy().copy()
        self.ring.give_back(self.host)
        return rows


@contextlib.contextmanager
def tf32_matmuls() -> Iterator[None]:
    """fp32 matrix products and convolutions on TF32 tensor cores inside the block only: the flags are restored
    after it, so a caller's own fp32 work keeps the precision it chose."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def forget_frames(error: BaseException) -> None:
    """Let go of the frames (and their tensors) an error's traceback holds: an out-of-memory error kept as the
    context of the line we raise would keep the batch's GPU memory alive in a notebook, defeating a retry."""
    traceback.clear_frames(error.__traceback__)
    error.__traceback__ = None


class Encoder:
    """Encodes images and texts into L2-normalized float32 features with one model."""

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, device: str, precision: str,
                 compile: bool = False, batch_size: int | None = None, decode: str = 'exact'):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device, self.precision = torch.device(device), precision
        self.input_dtype = open_clip.get_input_dtype(precision)
        self.pixels = Pixels(preprocess, decode)  # prepare: in the job's decoding workers; to_model: here
        self.batch_size = batch_size if compile else None  # compiled graphs take batches of one size
        cuda = self.device.type == 'cuda'
        self._normalization = self.pixels.normalization(self.device)
        self._copies = torch.cuda.Stream(self.device) if cuda else None
        self._ring = PinnedRing() if cuda else None
        self._tf32 = cuda and precision == 'fp32'  # TF32 tensor cores for fp32's matrix products (~1e-3 relative)
        self._image, self._text = model.encode_image, getattr(model, 'encode_text', None)
        if compile:
            self._image = torch.compile(self._image, fullgraph=True, dynamic=False)
            self._text = torch.compile(self._text, fullgraph=True, dynamic=False)

    @property
    def device_type(self) -> str:
        return self.device.type

    def _on_device(self) -> contextlib.ExitStack:
        """The device (and TF32 where fp32 is asked on a GPU) for the calls of one launch."""
        stack = contextlib.ExitStack()
        if self.device.type == 'cuda':
            stack.enter_context(torch.cuda.device(self.device))
        if self._tf32:
            stack.enter_context(tf32_matmuls())
        stack.enter_context(autocast(self.device.type, self.precision))
        return stack

    def _to_device(self, batch: torch.Tensor) -> torch.Tensor:
        """`batch` on the device: from pinned memory on the copy stream, which the compute stream then waits for."""
        if self._copies is None:
            return batch.to(self.device)
        compute = torch.cuda.current_stream(self.device)
        with torch.cuda.stream(self._copies):
            moved = batch.to(self.device, non_blocking=batch.is_pinned())
        compute.wait_stream(self._copies)
        moved.record_stream(compute)
        return moved

    def _padded(self, batch: torch.Tensor) -> torch.Tensor:
        """A compiled encoder's batch filled up to the batch size, on the device (no host copy)."""
        if self.batch_size is None or len(batch) >= self.batch_size:
            return batch
        return torch.cat([batch, batch.new_zeros((self.batch_size - len(batch), *batch.shape[1:]))])

    @torch.no_grad()
    def _launch(self, batch: torch.Tensor, encode: Callable, prepare: Callable) -> Launched:
        """Start encoding `batch` (the features come back by `result()`, without blocking on a GPU)."""
        rows = len(batch)
        try:
            with self._on_device():
                features = encode(prepare(self._padded(self._to_device(batch))))
                features = F.normalize(features.float(), dim=-1)
                if self._copies is None:
                    return Launched(features, rows)
                host = self._ring.take(features.shape, features.dtype)
                host.copy_(features, non_blocking=True)
                done = torch.cuda.Event()
                done.record(torch.cuda.current_stream(self.device))
                return Launched(host, rows, done, self._ring)
        except torch.cuda.OutOfMemoryError as e:
            forget_frames(e)
        raise ToolError(f"{self.device} ran out of memory on a batch of {rows}: give a smaller "
                        f"{param('batch_size')} (an output folder resumes where it stopped), or "
                        f"{param('precision', 'bf16')}")

    def launch_pixels(self, pixels: torch.Tensor) -> Launched:
        return self._launch(pixels, self._image,
                            lambda x: self.pixels.to_model(x, self.input_dtype, self._normalization))

    def launch_tokens(self, tokens: torch.Tensor) -> Launched:
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

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))

    def logit_scale(self) -> float:
        """`logit_scale.exp()` in float32 (an EVA model keeps `logit_scale` in float32 whatever its precision)."""
        return self.model.logit_scale.detach().float().exp().item()


def load_encoder(choice: ModelChoice, batch_size: int | None = None, decode: str = 'exact') -> Encoder:
    """The encoder of a checked choice whose device and precision are resolved (`ModelChoice.resolved`)."""
    from eva_open_clip.cpu_memory import keep_freed_memory
    from eva_open_clip.runtime.loading import load_model
    model, preprocess, tokenizer = load_model(choice, choice.device, choice.precision)
    if torch.device(choice.device).type == 'cpu':
        keep_freed_memory()
    return Encoder(model, preprocess, tokenizer, choice.device, choice.precision, choice.compile, batch_size, decode)
