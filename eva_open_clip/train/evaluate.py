"""Evaluation on held-out pairs: image-to-text and text-to-image recall@1 and the contrastive loss, over all of
them at once (the held-out shards are decoded once and kept)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from eva_open_clip.embed.job import Reading
from eva_open_clip.embed.units import Unit
from eva_open_clip.runtime.pixels import Pixels

BATCH = 64


class Evaluation:
    """The held-out pairs, decoded once; `run` evaluates a model on them."""

    def __init__(self, units: Sequence[Unit], pixels: Pixels, tokenizer, reading: Reading, workers: int):
        from eva_open_clip.train.data import decoded_shards
        shards = [(p, t) for _, p, t in decoded_shards(list(units), pixels, tokenizer, reading, workers, 'cpu', {})]
        self.pixels = torch.cat([p for p, _ in shards])
        self.tokens = torch.cat([t for _, t in shards])
        self.image_helper = pixels

    @torch.no_grad()
    def run(self, model, device: torch.device, dtype: torch.dtype, normalization, autocast: Callable) -> dict:
        was_training = model.training
        model.eval()
        images, texts = [], []
        try:
            with autocast():
                for start in range(0, len(self.pixels), BATCH):
                    x = self.image_helper.to_model(self.pixels[start:start + BATCH].to(device), dtype, normalization)
                    images.append(model.encode_image(x).float())
                    texts.append(model.encode_text(self.tokens[start:start + BATCH].to(device)).float())
        finally:
            model.train(was_training)
        image, text = F.normalize(torch.cat(images), dim=-1), F.normalize(torch.cat(texts), dim=-1)
        from eva_open_clip.train.fsdp import full_value
        logits = full_value(model.logit_scale.detach()).float().exp() * image @ text.T
        truth = torch.arange(len(image), device=logits.device)
        loss = (F.cross_entropy(logits, truth) + F.cross_entropy(logits.T, truth)) / 2
        return dict(pairs=len(image), image_to_text_r1=(logits.argmax(1) == truth).float().mean().item(),
                    text_to_image_r1=(logits.argmax(0) == truth).float().mean().item(), loss=loss.item())
