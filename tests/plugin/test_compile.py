"""Every registered architecture kind compiles whole (`torch.compile(fullgraph=True)`: one graph, no break) and the
compiled encoders give eager's features. The graphs are captured and run with the `aot_eager` backend here
(inductor's code generation takes minutes on this CPU); `tests/embed/test_embed_device_defaults.py` runs
`embed --compile` with inductor."""
from __future__ import annotations

import open_clip
import pytest
import torch

from support.checkpoints import REFERENCE_CASES, golden, register_reference, rel_err, released_state_dict


@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_the_encoders_compile_whole_and_give_eager_features(case, tmp_path):
    torch.save(released_state_dict(case), tmp_path / 'checkpoint.pt')
    model = open_clip.create_model(register_reference(case), pretrained=str(tmp_path / 'checkpoint.pt')).eval()
    reference = golden(case)
    torch._dynamo.reset()
    with torch.no_grad():
        for encode, inputs in ((model.encode_image, reference['pixels']), (model.encode_text, reference['tokens'])):
            compiled = torch.compile(encode, fullgraph=True, dynamic=False, backend='aot_eager')
            assert rel_err(compiled(inputs, normalize=True), encode(inputs, normalize=True)) < 1e-6
