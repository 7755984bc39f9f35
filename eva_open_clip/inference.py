"""What the command-line tools share: loading a model by tag or path, finding images, encoding batches."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import open_clip
import torch
from open_clip.pretrained import download_pretrained, get_pretrained_cfg, list_pretrained_tags_by_model
from PIL import Image

from . import data
from .errors import ToolError

BUNDLED_IMAGE = Path(__file__).parent / 'assets' / 'CLIP.png'


def default_device() -> str:
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def default_pretrained(model_name: str) -> str | None:
    """The model's first pretrained tag (the released weights on the hub), if it has one."""
    tags = list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else None


def _ensure_downloaded(model_name: str, tag: str) -> None:
    cfg = get_pretrained_cfg(model_name, tag)
    try:
        download_pretrained(cfg)  # huggingface_hub shows its progress bar; later runs use its cache
    except Exception as e:
        filename = cfg.get('hf_hub', '').rsplit('/', 1)[-1] or 'the checkpoint'
        raise ToolError(
            f"could not download {cfg.get('hf_hub')} for --pretrained {tag}: the Hugging Face hub is not "
            f"reachable (offline?) and no copy is cached ({type(e).__name__}). Download {filename} where "
            f"there is network and pass --pretrained /path/to/{filename}") from None


def load_model(model_name: str, pretrained: str | None, device: str, precision: str):
    """(model in eval mode, inference transform, tokenizer) for a registered model and a tag or path."""
    if model_name not in open_clip.list_models():
        raise ToolError(f"unknown model '{model_name}'")
    pretrained = pretrained or default_pretrained(model_name)
    if not pretrained:
        raise ToolError(f"'{model_name}' has no pretrained tag: pass --pretrained /path/to/checkpoint")
    if get_pretrained_cfg(model_name, pretrained):
        _ensure_downloaded(model_name, pretrained)
    elif not os.path.isfile(pretrained):
        raise ToolError(f"--pretrained {pretrained}: not a file, nor a tag of {model_name} "
                        f"({', '.join(list_pretrained_tags_by_model(model_name)) or 'none'})")
    model, preprocess = open_clip.create_model_from_pretrained(
        model_name, pretrained=pretrained, device=device, precision=precision)
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found under folders (recursively, in path order), each once."""
    sources, _ = data.unique_sources(data.input_sources([str(p) for p in paths], None))
    return [Path(s.path) for s in sources if not s.is_shard]


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
        with self._autocast():
            return self.model.encode_image(pixels, normalize=True).float().cpu()

    @torch.no_grad()
    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens.to(self.device, non_blocking=tokens.is_pinned())
        with self._autocast():
            return self.model.encode_text(tokens, normalize=True).float().cpu()

    def images(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.encode_pixels(torch.stack([self.preprocess(image) for image in images]))

    def texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenizer(list(texts)))

    def logit_scale(self) -> float:
        return self.model.logit_scale.detach().exp().item()
