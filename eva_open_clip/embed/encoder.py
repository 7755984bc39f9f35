"""Encoding batches with one model: L2-normalized float32 features of images and texts, on its device."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Sequence

import open_clip
import torch
from PIL import Image

from eva_open_clip.errors import ToolError, param


class Encoder:
    """Encodes images and texts into L2-normalized float32 features with one model."""

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, device: str, precision: str):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = device
        self.input_dtype = open_clip.get_input_dtype(precision)
        amp = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}.get(precision)
        self._autocast = (lambda: torch.autocast(torch.device(device).type, dtype=amp)) if amp else \
            contextlib.nullcontext

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @torch.no_grad()
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of a batch of preprocessed images (pinned CPU memory is copied without blocking)."""
        pixels = pixels.to(self.device, dtype=self.input_dtype, non_blocking=pixels.is_pinned())
        with self._autocast(), self._out_of_memory(len(pixels)):
            return self.model.encode_image(pixels, normalize=True).float().cpu()

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=tokens.is_pinned())
        with self._autocast(), self._out_of_memory(len(tokens)):
            return self.model.encode_text(tokens, normalize=True).float().cpu()

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


def load_encoder(model_name: str, pretrained: str | None, device: str | None, precision: str) -> Encoder:
    """The encoder of a registered model and a tag or file (see `loading.load_model`), on `device` (the default
    device when None)."""
    from eva_open_clip.embed.cpu_memory import keep_freed_memory
    from eva_open_clip.embed.devices import default_device
    from eva_open_clip.loading import load_model
    device = device or default_device()
    model, preprocess, tokenizer = load_model(model_name, pretrained, device, precision)
    if device == 'cpu':
        keep_freed_memory()
    return Encoder(model, preprocess, tokenizer, device, precision)
