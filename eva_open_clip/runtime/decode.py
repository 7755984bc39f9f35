"""Decoding a sample's image and caption: bounded pixels (judged from the header), 8-bit channels, text."""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
from PIL import Image

from eva_open_clip.runtime.defaults import MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from eva_open_clip.runtime.skips import Reason, Skip


@dataclass(frozen=True)
class PixelLimits:
    """The most pixels an image may have decoded (`decoded`), and once its short side is resized to `side`
    (`resized`, as the model's transform does); a larger image is an `image_too_large` skip, found from
    its header before its pixels are decoded. The default for `decoded` is PIL's own guard against
    decompression bombs (which only warns below twice that); `resized` allows an aspect ratio of about
    330:1 at 224 px (a 1x10000 strip would resize to 224x2240000).
    """

    decoded: int = MAX_IMAGE_PIXELS
    resized: int = MAX_RESIZED_PIXELS
    side: int = 224

    def check(self, width: int, height: int) -> None:
        if width * height > self.decoded:
            raise ImageRefused(Reason.IMAGE_TOO_LARGE,
                               f'{width}x{height} pixels, over the limit of {self.decoded} (max_image_pixels)')
        short, long = sorted((width, height))
        if short and self.side * round(self.side * long / short) > self.resized:
            resized = round(self.side * long / short)
            raise ImageRefused(Reason.IMAGE_TOO_LARGE, f'{width}x{height} resizes to {self.side}x{resized}, '
                                                       f'over the limit of {self.resized} (max_resized_pixels)')


class ImageRefused(ValueError):
    """An image that is not decoded, with a skip reason code."""

    def __init__(self, reason: Reason, detail: str):
        super().__init__(detail)
        self.reason = reason


_16_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def _eight_bit(image: Image.Image) -> Image.Image:
    """The image with 8-bit channels: 16-bit greyscale reduced by its high byte (v >> 8), as PIL itself
    reduces 16-bit RGB; `convert('RGB')`, the model's transform's first step, would clip it to white."""
    if image.mode not in _16_BIT + ('I', 'F'):
        return image.copy()
    if image.mode == 'F':
        raise ImageRefused(Reason.UNSUPPORTED_PIXELS, 'floating-point pixels (PIL mode F)')
    values = np.asarray(image)
    if image.mode == 'I' and (values.min() < 0 or values.max() > 65535):
        raise ImageRefused(Reason.UNSUPPORTED_PIXELS, '32-bit integer pixels beyond 16 bits (PIL mode I)')
    return Image.fromarray((values >> 8).astype(np.uint8))


@contextlib.contextmanager
def opened(source: Any, limits: PixelLimits | None = None) -> Iterator[Image.Image]:
    """The image of a path or of an image file's bytes, opened but not decoded (raises on failure).

    With `limits`, an image over them raises `ImageRefused` before its pixels are decoded (and PIL's own
    decompression-bomb guard, which they replace, is off while it is open).
    """
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        if limits is not None:
            Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                if limits is not None:
                    limits.check(*image.size)
                yield image
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def open_image(source: Any, limits: PixelLimits | None = None) -> Image.Image:
    """The decoded image of a path or of an image file's bytes, with 8-bit channels (raises on failure; see
    `opened` for `limits`)."""
    with opened(source, limits) as image:
        image.load()
        return _eight_bit(image)


def caption_text(caption: Any) -> str | Skip:
    """The caption as text, or the reason it is not usable."""
    if caption is None:
        return Skip(None, Reason.NO_CAPTION)
    if isinstance(caption, bytes):
        try:
            caption = caption.decode('utf-8')
        except UnicodeDecodeError:
            return Skip(None, Reason.CAPTION_NOT_TEXT, 'not UTF-8')
    return caption.strip()
