"""The original EVA-CLIP `clip` module API, on top of open_clip.

Code written against the EVA-01 release keeps working with only its import changed:

    from eva_open_clip.compat import build_eva_model_and_transforms, tokenize
    import eva_open_clip.compat as clip   # clip.create_model_and_transforms(...), clip.tokenize(...)
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple, Union

import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CustomTextCLIP

_TOKENIZER = open_clip.SimpleTokenizer()


class OriginalApiCLIP(CustomTextCLIP):
    """An open_clip EVA model whose `model(image, text)` returns the original API's logits."""

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(logits_per_image, logits_per_text): cosine similarities times `logit_scale.exp()` (100)."""
        image_features = F.normalize(self.encode_image(image), dim=-1)
        text_features = F.normalize(self.encode_text(text), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_eva_model_and_transforms(
        model_name: str,
        pretrained: str = '',
        precision: str = 'fp32',
        device: Union[str, torch.device] = 'cpu',
        force_quick_gelu: bool = False,
        image_mean: Optional[Tuple[float, ...]] = None,
        image_std: Optional[Tuple[float, ...]] = None,
) -> Tuple[OriginalApiCLIP, Callable]:
    """Build an EVA model and its inference transform, as the original `clip` module did.

    `pretrained` is a checkpoint path or a pretrained tag (downloaded through huggingface_hub). The
    model is returned in eval mode, as the original's was (its README examples rely on it); open_clip's
    own factories keep open_clip's convention and return models in training mode.
    """
    model, preprocess = open_clip.create_model_from_pretrained(
        model_name, pretrained=pretrained or None, precision=precision, device=device,
        force_quick_gelu=force_quick_gelu, image_mean=image_mean, image_std=image_std)
    model.__class__ = OriginalApiCLIP
    return model.eval(), preprocess


def create_model_and_transforms(model_name: str, pretrained: str = '') -> Tuple[OriginalApiCLIP, Callable]:
    """The original module's `create_model_and_transforms(model_name, pretrained)` (CIFAR-100 example)."""
    return build_eva_model_and_transforms(model_name, pretrained)


def tokenize(texts: Union[str, List[str]], context_length: int = 77, truncate: bool = False) -> torch.LongTensor:
    """CLIP BPE tokens, [len(texts), context_length]; too long a text is an error unless `truncate`."""
    if isinstance(texts, str):
        texts = [texts]
    if not truncate:
        for text in texts:
            if len(_TOKENIZER.encode(text)) + 2 > context_length:
                raise RuntimeError(f'Input {text} is too long for context length {context_length}')
    return _TOKENIZER(texts, context_length=context_length)
