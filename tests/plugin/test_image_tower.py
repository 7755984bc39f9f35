"""`load_image_tower`: files holding only the image tower (the release's `visual.` part)."""
from __future__ import annotations

import open_clip
import pytest
import torch

import eva_open_clip
from support.checkpoints import golden, register_reference, rel_err, released_state_dict


def _visual_only(case, prefix):
    sd = released_state_dict(case)
    return {prefix + k[len('visual.'):]: v for k, v in sd.items() if k.startswith('visual.')}


@pytest.mark.parametrize('case', ['tiny_a', 'e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a'])
@pytest.mark.parametrize('prefix', ['visual.', ''])
def test_image_tower_loads_strictly(case, prefix, tmp_path):
    path = tmp_path / 'visual.pt'
    torch.save(_visual_only(case, prefix), path)
    model = open_clip.create_model(register_reference(case))
    text_before = {k: v.clone() for k, v in model.text.state_dict().items()}
    eva_open_clip.load_image_tower(model, path)
    g = golden(case)
    with torch.no_grad():
        assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-3
    assert all(torch.equal(v, model.text.state_dict()[k]) for k, v in text_before.items())


def test_image_tower_errors_name_keys_as_in_the_file(tmp_path):
    sd = _visual_only('tiny_a', '')
    del sd['blocks.0.attn.q_bias']
    sd['head.weight'] = torch.zeros(8, 64, dtype=torch.float16)
    path = tmp_path / 'visual.pt'
    torch.save(sd, path)
    with pytest.raises(eva_open_clip.CheckpointError) as info:
        eva_open_clip.load_image_tower(open_clip.create_model(register_reference('tiny_a')), path)
    message = str(info.value)
    assert str(path) in message and "'blocks.0.attn.q_bias'" in message and "'visual." not in message


def test_a_full_checkpoint_is_not_an_image_tower(tmp_path, tiny_checkpoint):
    with pytest.raises(eva_open_clip.CheckpointError, match="unexpected key.*'text"):
        eva_open_clip.load_image_tower(open_clip.create_model(register_reference('tiny_a')), tiny_checkpoint)


def test_image_tower_file_problems(tmp_path):
    path = tmp_path / 'visual.pt'
    path.write_bytes(b'')
    with pytest.raises(eva_open_clip.CheckpointError, match='empty'):
        eva_open_clip.load_image_tower(open_clip.create_model(register_reference('tiny_a')), path)
