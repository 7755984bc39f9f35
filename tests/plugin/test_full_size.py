"""Full-size EVA_CLIP_g_14 from a generated checkpoint with every released key and shape."""
from __future__ import annotations

import open_clip
import pytest
import torch
from PIL import Image

from support.checkpoints import DATA, G14_VALUES

pytestmark = pytest.mark.full_size


def test_g14_loads_strictly_and_encodes(g14_checkpoint):
    model, _, preprocess = open_clip.create_model_and_transforms('EVA_CLIP_g_14', pretrained=str(g14_checkpoint))
    tokenizer = open_clip.get_tokenizer('EVA_CLIP_g_14')
    assert sum(p.numel() for p in model.parameters()) == G14_VALUES
    sd = torch.load(str(g14_checkpoint), mmap=True, weights_only=True)
    assert torch.equal(model.visual.trunk.blocks[39].mlp.fc1.weight, sd['visual.blocks.39.mlp.fc1.weight'].float())
    assert torch.equal(model.visual.trunk.head.bias, sd['visual.head.bias'].float())
    assert model.logit_scale.item() == pytest.approx(sd['text.logit_scale'].item())
    image = preprocess(Image.open(DATA / 'images' / 'clip_diagram_rgba.png')).unsqueeze(0)
    with torch.no_grad():
        image_features = model.eval().encode_image(image)
        text_features = model.encode_text(tokenizer(['a diagram']))
    assert image_features.shape == (1, 1024) and text_features.shape == (1, 1024)
    assert torch.isfinite(image_features).all() and torch.isfinite(text_features).all()
