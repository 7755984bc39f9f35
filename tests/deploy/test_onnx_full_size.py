"""`export-onnx` of the full-size EVA02-CLIP-B-16 (rotary, SwiGLU, sub-LN at full width and depth): exact
under ONNX Runtime."""
from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from support.cli import main_here
from support.onnx import CORPUS, ids, immich_tokenizer, needs_export, session

pytestmark = [pytest.mark.full_size, needs_export]


def test_b16_export_matches_open_clip(b16_checkpoint, tmp_path):
    out = tmp_path / 'onnx'
    result = main_here('export-onnx', 'EVA02-CLIP-B-16', out, '--pretrained', b16_checkpoint)
    assert result.returncode == 0, result.stderr
    model = open_clip.create_model('EVA02-CLIP-B-16', pretrained=str(b16_checkpoint)).eval()
    tokenizer = open_clip.get_tokenizer('EVA02-CLIP-B-16')
    image_session, text_session = session(out / 'visual' / 'model.onnx'), session(out / 'textual' / 'model.onnx')
    for batch in (1, 7):
        images = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        texts = CORPUS[2:2 + batch]
        with torch.no_grad():
            want_image = model.encode_image(images, normalize=True).numpy()
            want_text = model.encode_text(tokenizer(texts), normalize=True).numpy()
        image = image_session.run(None, {'image': images.numpy()})[0]
        text = text_session.run(None, {'text': ids(immich_tokenizer(out), texts)})[0]
        assert np.abs(image - want_image).max() <= 1e-5
        assert np.abs(text - want_text).max() <= 1e-5
