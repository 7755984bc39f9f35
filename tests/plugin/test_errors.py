"""Bad checkpoints fail with a short message naming the file and the keys as spelled in it."""
from __future__ import annotations

import os

import open_clip
import pytest
import torch

from eva_open_clip import CheckpointError
from support.checkpoints import golden, register_reference, rel_err, released_state_dict

MAX_MESSAGE = 2000


def _load(path):
    return open_clip.create_model_and_transforms(register_reference('tiny_a'), pretrained=str(path))


def _error(path) -> str:
    with pytest.raises(CheckpointError) as info:
        _load(path)
    message = str(info.value)
    assert len(message) < MAX_MESSAGE
    assert str(path) in message
    return message


def _saved(tmp_path, sd, name='bad.pt'):
    path = tmp_path / name
    torch.save(sd, path)
    return path


def test_missing_path(tmp_path):
    _error(tmp_path / 'nope.pt')


def test_directory(tmp_path):
    _error(tmp_path)


def test_empty_file(tmp_path):
    path = tmp_path / 'empty.pt'
    path.write_bytes(b'')
    assert 'empty' in _error(path)


def test_truncated_file(tmp_path, tiny_checkpoint):
    path = tmp_path / 'truncated.pt'
    path.write_bytes(tiny_checkpoint.read_bytes()[:100_000])
    assert 'truncated' in _error(path)


@pytest.mark.parametrize('content', [b'this is a text file, not weights\n' * 10, b'\x89PNG\r\n\x1a\n' + bytes(300)])
def test_not_a_checkpoint(tmp_path, content):
    path = tmp_path / 'notes.pt'
    path.write_bytes(content)
    _error(path)


def test_truncated_safetensors(tmp_path):
    path = tmp_path / 'cut.safetensors'
    path.write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    _error(path)


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f'touch {self.marker}',)


def test_pickle_that_runs_code_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / 'was_executed'
    sd = released_state_dict('tiny_a')
    sd['payload'] = _RunsCode(marker)
    message = _error(_saved(tmp_path, sd))
    assert 'refused' in message
    assert not marker.exists()


def test_checkpoint_of_another_eva_architecture(tmp_path):
    message = _error(_saved(tmp_path, released_state_dict('e02_tiny_a')))
    assert 'visual.blocks.0.attn.q_proj.weight' in message  # as spelled in the file


def test_checkpoint_of_a_non_eva_model(tmp_path):
    sd = {k: torch.zeros(1) for k in ('visual.conv1.weight', 'visual.class_embedding', 'visual.proj',
                                      'text_projection', 'token_embedding.weight', 'logit_scale')}
    assert 'not look like an EVA-CLIP checkpoint' in _error(_saved(tmp_path, sd))


def test_missing_key(tmp_path):
    sd = released_state_dict('tiny_a')
    del sd['visual.blocks.1.mlp.fc2.bias']
    message = _error(_saved(tmp_path, sd))
    assert "1 missing key(s): 'visual.blocks.1.mlp.fc2.bias'" in message
    assert 'trunk' not in message


def test_missing_keys_are_named_in_the_eva02_layout(tmp_path):
    sd = released_state_dict('e02_tiny_a')
    del sd['visual.blocks.0.mlp.w3.weight'], sd['visual.blocks.1.attn.q_bias'], sd['visual.blocks.0.mlp.ffn_ln.bias']
    path = _saved(tmp_path, sd)
    with pytest.raises(CheckpointError) as info:
        open_clip.create_model(register_reference('e02_tiny_a'), pretrained=str(path))
    message = str(info.value)
    for key in ('visual.blocks.0.mlp.w3.weight', 'visual.blocks.1.attn.q_bias', 'visual.blocks.0.mlp.ffn_ln.bias'):
        assert key in message


def test_unexpected_key(tmp_path):
    sd = released_state_dict('tiny_a')
    sd['visual.blocks.2.norm1.weight'] = torch.ones(64, dtype=torch.float16)
    assert "1 unexpected key(s): 'visual.blocks.2.norm1.weight'" in _error(_saved(tmp_path, sd))


def test_shape_mismatch(tmp_path):
    sd = released_state_dict('tiny_a')
    sd['visual.head.weight'] = torch.zeros(16, 64, dtype=torch.float16)
    message = _error(_saved(tmp_path, sd))
    assert "'visual.head.weight' has shape [16, 64], the model expects [32, 64]" in message


def test_many_bad_keys_give_a_short_message(tmp_path):
    sd = {f'visual.extra.{i}': torch.zeros(1) for i in range(600)}
    sd.update(released_state_dict('tiny_a'))
    message = _error(_saved(tmp_path, sd))
    assert '600 unexpected key(s)' in message and 'and 595 more' in message


def test_failure_leaves_the_process_usable(tmp_path, tiny_checkpoint):
    sd = released_state_dict('tiny_a')
    sd['visual.head.weight'] = torch.zeros(16, 64, dtype=torch.float16)
    _error(_saved(tmp_path, sd))
    model, _, _ = _load(tiny_checkpoint)
    g = golden('tiny_a')
    with torch.no_grad():
        assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-4


def test_failed_load_into_existing_model_changes_nothing(tmp_path, tiny_checkpoint):
    model, _, _ = _load(tiny_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sd = released_state_dict('tiny_a')
    sd = {k: v * 2 for k, v in sd.items()}
    sd['visual.head.weight'] = torch.zeros(16, 64, dtype=torch.float16)
    with pytest.raises(ValueError):
        open_clip.load_checkpoint(model, str(_saved(tmp_path, sd)))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
