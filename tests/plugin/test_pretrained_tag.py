"""Pretrained tags resolve through huggingface_hub and work offline from its cache."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from support.checkpoints import DATA, released_state_dict


def _hub_cache(root, repo_id, filename, state_dict):
    """Lay out a huggingface_hub cache holding `filename` of `repo_id` (as a download leaves it)."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    revision = '0123456789abcdef0123456789abcdef01234567'
    (repo / 'refs').mkdir(parents=True)
    (repo / 'refs' / 'main').write_text(revision)
    snapshot = repo / 'snapshots' / revision
    snapshot.mkdir(parents=True)
    torch.save(state_dict, snapshot / filename)
    return snapshot / filename


def test_tag_resolves_offline_from_the_hub_cache(tmp_path):
    cache = tmp_path / 'hub'
    _hub_cache(cache, 'eva-test/tiny-eva', 'tiny_psz14.pt', released_state_dict('tiny_a'))
    code = textwrap.dedent(f'''
        import sys, torch, open_clip, eva_open_clip
        sys.path.insert(0, {str(DATA.parent)!r})
        from support.checkpoints import golden, rel_err
        g = golden('tiny_a')
        eva_open_clip.register_eva_model('test-tagged', g['config'],
                                         pretrained={{'tiny_s1b_b1k': 'eva-test/tiny-eva/tiny_psz14.pt'}})
        assert ('test-tagged', 'tiny_s1b_b1k') in open_clip.list_pretrained()
        model, _, _ = open_clip.create_model_and_transforms('test-tagged', pretrained='tiny_s1b_b1k')
        with torch.no_grad():
            assert rel_err(model.eval().encode_image(g['pixels']), g['image_features']) < 1e-4
        print('resolved')
    ''')
    env = dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / 'home'))
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert 'resolved' in out.stdout
