"""From an image file to the model's input, split where it is cheapest: 8-bit pixels made in the decoding workers
(`Pixels.prepare`), scaled and normalized on the model's device (`Pixels.to_model`).

open_clip's inference transform is a PIL part (resize, center crop, RGB), `ToTensor` (to float, / 255) and
`Normalize`. The workers run the PIL part and hand over uint8 tensors (a quarter of the bytes of float32); the
device does `ToTensor`'s scaling and `Normalize` with the same float32 operations, so the model's input is
the one open_clip's transform gives, bit for bit (`exact`). A transform of another shape is run whole in
the workers, as before.

`fast` decodes JPEGs at a reduced scale where that still leaves at least twice the model's image size (PIL's
`draft`, DCT-domain scaling in libjpeg), to RGB, then resizes and crops the uint8 pixels in torch
(antialiased, the transform's interpolation). Every other format goes the `exact` way. It moves a pixel by a
few levels and a feature by about 1e-3 (docs/embed.md gives the measured bounds); EXIF orientation is
ignored in both modes, as open_clip's transform ignores it.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as tv
from torchvision.transforms.v2.functional import center_crop, resize

from eva_open_clip.runtime.decode import PixelLimits, open_image, opened

MODES = ('exact', 'fast')
DRAFT_MARGIN = 2  # a JPEG is decoded at no less than twice the model's image size


@dataclass(frozen=True)
class _Geometry:
    """What the PIL part does to an image's size: its short side to `resize`, then a center crop to `crop`."""

    resize: int
    crop: tuple[int, int]
    interpolation: tv.InterpolationMode


def _split(preprocess: Callable) -> tuple[Callable | None, tuple | None, tuple | None]:
    """(the transform's PIL part, Normalize's mean and std) of open_clip's inference transform, else Nones."""
    steps = list(getattr(preprocess, 'transforms', ()))
    at = next((i for i, t in enumerate(steps) if isinstance(t, tv.ToTensor)), None)
    if at is None or at != len(steps) - 2 or not isinstance(steps[-1], tv.Normalize):
        return None, None, None
    normalize = steps[-1]
    return tv.Compose(steps[:at]), tuple(map(float, normalize.mean)), tuple(map(float, normalize.std))


def _geometry(pil_part: tv.Compose) -> _Geometry | None:
    """The resize and crop of a PIL part that is [Resize(short side), CenterCrop, to RGB], else None."""
    steps = pil_part.transforms
    if len(steps) != 3 or not isinstance(steps[0], tv.Resize) or not isinstance(steps[1], tv.CenterCrop):
        return None
    size = steps[0].size
    size = size[0] if isinstance(size, (list, tuple)) and len(size) == 1 else size
    if not isinstance(size, int) or getattr(steps[0], 'max_size', None):
        return None
    crop = tuple(steps[1].size) if isinstance(steps[1].size, (list, tuple)) else (steps[1].size,) * 2
    return _Geometry(size, (int(crop[0]), int(crop[-1])), steps[0].interpolation)


def _as_uint8(image: Image.Image) -> torch.Tensor:
    """A PIL image's RGB pixels as a uint8 [3, H, W] tensor, channels last in memory (one copy out of PIL; torch's
    antialiased uint8 resize is fastest on this layout)."""
    rgb = image if image.mode == 'RGB' else image.convert('RGB')
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)


class Pixels:
    """The model's input from an image: `prepare` in a decoding worker, `to_model` on the device (picklable)."""

    def __init__(self, preprocess: Callable, mode: str = 'exact'):
        if mode not in MODES:
            raise ValueError(f'decode mode {mode!r}: choose from {", ".join(MODES)}')
        self.preprocess, self.mode = preprocess, mode
        self.pil_part, self.mean, self.std = _split(preprocess)
        self.geometry = _geometry(self.pil_part) if self.pil_part is not None and mode == 'fast' else None

    @property
    def split(self) -> bool:
        """Whether workers hand over uint8 pixels (open_clip's transform), or the transform's float output."""
        return self.pil_part is not None

    def prepare(self, source: Any, limits: PixelLimits | None = None) -> torch.Tensor:
        """The pixels of a path or an image file's bytes: uint8 [3, H, W] where `split`, else the transform's output.
        Raises as `decode.open_image` does."""
        if self.geometry is not None:
            fast = self._fast_jpeg(source, limits)
            if fast is not None:
                return fast
        image = open_image(source, limits)
        if not self.split:
            return self.preprocess(image)
        return _as_uint8(self.pil_part(image)).contiguous()

    def _fast_jpeg(self, source: Any, limits: PixelLimits | None) -> torch.Tensor | None:
        """A JPEG decoded at reduced scale where that leaves at least twice the model's size (PIL's `draft`), resized
        and cropped in torch. None for any other format."""
        side = self.geometry.resize * DRAFT_MARGIN
        with opened(source, limits) as image:
            if image.format != 'JPEG':
                return None
            if min(image.size) >= 2 * side:  # libjpeg scales the DCT by 1/2, 1/4 or 1/8
                scale = side / min(image.size)
                image.draft('RGB', (max(1, round(image.width * scale)), max(1, round(image.height * scale))))
            pixels = _as_uint8(image)
        resized = resize(pixels, [self.geometry.resize], interpolation=self.geometry.interpolation, antialias=True)
        return center_crop(resized, list(self.geometry.crop)).contiguous()

    def sample_bytes(self) -> int:
        """The bytes of one prepared image, as handed over."""
        return self.prepare(_blank()).numel() * (1 if self.split else 4)

    def normalization(self, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`Normalize`'s mean and std as float32 [3, 1, 1] tensors on `device`, made once by the caller (a copy
        from pageable memory at every batch would make the host wait for the device), or None."""
        if self.mean is None:
            return None
        return tuple(torch.tensor(v, dtype=torch.float32).view(-1, 1, 1).to(device) for v in (self.mean, self.std))

    def to_model(self, pixels: torch.Tensor, dtype: torch.dtype,
                 normalization: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """A batch of prepared images (on the model's device) as the model's input in `dtype`: uint8 pixels scaled
        and normalized as open_clip's `ToTensor` and `Normalize` do, in float32 (`normalization`: the mean and
        std already on the device, see `normalization`)."""
        if pixels.dtype != torch.uint8:
            return pixels.to(dtype)
        mean, std = normalization or self.normalization(pixels.device)
        x = pixels.to(torch.float32).div(255)
        return x.sub_(mean).div_(std).to(dtype)


def _blank() -> bytes:
    buffer = io.BytesIO()
    Image.new('RGB', (8, 8)).save(buffer, 'PNG')
    return buffer.getvalue()
