"""What the command-line tools share: loading a model by tag or path, finding images, encoding batches."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import open_clip
import torch
from open_clip.pretrained import get_pretrained_cfg
from PIL import Image

from . import data
from .checks import check_model, check_pretrained_option
from .errors import ToolError, UsageError, UserError
from .hub import ensure_downloaded

BUNDLED_IMAGE = Path(__file__).parent / 'assets' / 'CLIP.png'


def load_model(model_name: str, pretrained: str | None, device: str, precision: str):
    """(model in eval mode, inference transform, tokenizer) for a registered model and a tag or path.

    A tag's file is downloaded first (failing at once when the hub cannot be reached). What open_clip
    or timm raise for a file of another architecture is said in one line naming both.
    """
    check_model(model_name)
    pretrained = check_pretrained_option(model_name, pretrained)
    if get_pretrained_cfg(model_name, pretrained):
        ensure_downloaded(model_name, pretrained)
    try:
        model, preprocess = open_clip.create_model_from_pretrained(
            model_name, pretrained=pretrained, device=device, precision=precision)
    except UserError:
        raise
    except (AssertionError, KeyError, RuntimeError, ValueError, TypeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        if 'out of memory' in first.lower():
            raise ToolError(f'out of memory loading {model_name} on {device} ({first}): try --precision bf16, '
                            f'or a machine with more memory') from None
        raise ToolError(f'--pretrained {pretrained} does not fit --model {model_name} ({type(e).__name__}: '
                        f'{first}){_fitting_model(pretrained)}') from None
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def _fitting_model(path: str) -> str:
    """'; its keys and shapes are those of X: give --model X' for a released-layout file, if one fits."""
    from .checkpoint import read_state_dict
    from .export import detect_model
    try:
        found = detect_model(read_state_dict(path)) if os.path.isfile(path) else None
    except (UserError, ValueError, KeyError):
        found = None
    if found:
        return f'; its keys and shapes are those of {found}: give --model {found}'
    return '; give the --model it was made for (a custom architecture: --register NAME=CONFIG.json --model NAME)'


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found under folders (recursively, in path order), each once.

    Tar shards are refused: they are `embed`'s inputs."""
    sources, _ = data.unique_sources(data.input_sources([str(p) for p in paths], None))
    shards = [s for s in sources if s.is_shard]
    if shards:
        raise UsageError(f'{shards[0].path} is a tar shard: classify takes image files and folders of them '
                         f'(`eva-open-clip embed` reads shards)')
    return [Path(s.path) for s in sources]


def _opened(path: Path) -> Image.Image | None:
    try:
        return data.open_image(path)
    except Exception:  # PIL raises many types for damaged or non-image files
        return None


def decode(paths: Sequence[Path]) -> tuple[list[Path], list[Image.Image], list[str]]:
    """(decoded paths, their images, paths that could not be decoded), keeping the order."""
    opened = [(p, _opened(p)) for p in paths]
    kept = [(p, image) for p, image in opened if image is not None]
    return [p for p, _ in kept], [image for _, image in kept], [str(p) for p, image in opened if image is None]


def warn_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        print(f'warning: skipped {len(skipped)} file(s) that could not be decoded: {", ".join(skipped)}',
              file=sys.stderr)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


class Encoder:
    """Encodes images and texts into L2-normalized float32 features with one model."""

    def __init__(self, model, preprocess: Callable, tokenizer: Callable, device: str, precision: str):
        self.model, self.preprocess, self.tokenizer = model, preprocess, tokenizer
        self.device = device
        self.input_dtype = open_clip.get_input_dtype(precision)
        amp = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}.get(precision)
        self._autocast = (lambda: torch.autocast(torch.device(device).type, dtype=amp)) if amp else contextlib.nullcontext

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
            raise ToolError(f'{self.device} ran out of memory on a batch of {batch}: give a smaller --batch-size '
                            f'(an output folder resumes where it stopped), or --precision bf16') from None

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))

    def logit_scale(self) -> float:
        return self.model.logit_scale.detach().exp().item()
