"""The original EVA-CLIP `clip` API: both README examples run with only their import line changed."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

import eva_open_clip.compat as clip
from eva_open_clip.classify import BUNDLED_IMAGE
from support.checkpoints import golden, register_reference, rel_err

EXAMPLES = Path(__file__).resolve().parents[1] / 'examples'
# stands in for torchvision's CIFAR100 download: 100 class names, and image 3637 in memory
IN_MEMORY_CIFAR = '''
from PIL import Image
class CIFAR100:
    def __init__(self, root=None, download=False, train=False):
        self.classes = [f"class {i}" for i in range(99)] + ["snake"]
    def __getitem__(self, index):
        return Image.new("RGB", (32, 32), (index % 256, 90, 40)), 99
'''


def test_tokenize_is_the_original():
    g = golden('tiny_a')
    assert torch.equal(clip.tokenize(g['captions']), g['tokens'])
    assert clip.tokenize('a cat').shape == (1, 77)
    long_text = 'a photo of a cat ' * 30
    with pytest.raises(RuntimeError, match='too long for context length 77'):
        clip.tokenize(long_text)
    truncated = clip.tokenize(long_text, truncate=True)
    assert truncated.shape == (1, 77) and truncated[0, -1].item() == 49407
    assert clip.tokenize('a cat', context_length=10).shape == (1, 10)


def test_model_call_returns_the_original_logits(tiny_checkpoint):
    name = register_reference('tiny_a')
    model, preprocess = clip.build_eva_model_and_transforms(name, pretrained=str(tiny_checkpoint))
    g = golden('tiny_a')
    with torch.no_grad():
        logits_per_image, logits_per_text = model.eval()(g['pixels'], g['tokens'])
        image = model.encode_image(g['pixels'])
    assert rel_err(image, g['image_features']) < 1e-4
    image_n = g['image_features'] / g['image_features'].norm(dim=-1, keepdim=True)
    text_n = g['text_features'] / g['text_features'].norm(dim=-1, keepdim=True)
    expected = g['logit_scale'].exp() * image_n @ text_n.T
    assert torch.allclose(logits_per_image, expected, atol=1e-3)
    assert torch.equal(logits_per_text, logits_per_image.T)
    assert isinstance(model, open_clip.CustomTextCLIP)  # still an open_clip model in every other respect
    assert set(model.state_dict()) == set(open_clip.create_model(register_reference('tiny_a')).state_dict())


def _run_example(name, tmp_path, substitutions):
    source = (EXAMPLES / name).read_text()
    for old, new in substitutions.items():
        assert old in source
        source = source.replace(old, new)
    script = tmp_path / name
    script.write_text(source)
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          cwd=tmp_path, env=dict(os.environ, PYTHONPATH=str(tmp_path)))


def _eval_mode_features(checkpoint, images, texts):
    """Features of the model in eval mode through open_clip's API: what the original's examples print."""
    model, _, preprocess = open_clip.create_model_and_transforms('EVA_CLIP_g_14', pretrained=str(checkpoint))
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(clip.tokenize(texts), normalize=True)
    return image, text, model.logit_scale.exp().item()


def test_original_factories_return_eval_mode(tiny_checkpoint):
    model, _ = clip.build_eva_model_and_transforms(register_reference('tiny_a'), pretrained=str(tiny_checkpoint))
    assert not model.training and not any(m.training for m in model.modules())
    name = register_reference('tiny_a')
    assert open_clip.create_model(name, pretrained=str(tiny_checkpoint)).training  # open_clip's own


@pytest.mark.full_size
def test_readme_example(tmp_path, g14_checkpoint):
    """Run as written (no model.eval() in it), it prints the eval-mode probabilities, every time."""
    from PIL import Image
    runs = []
    for _ in range(2):
        result = _run_example('readme_example.py', tmp_path, {
            '/path/to/eva_clip_psz14.pt': repr(str(g14_checkpoint)), '/path/to/image.png': repr(str(BUNDLED_IMAGE))})
        assert result.returncode == 0, result.stderr[-3000:]
        runs.append([float(x) for x in re.findall(r'[\d.e-]+', result.stdout.split('Label probs:')[1])])
    image, text, scale = _eval_mode_features(g14_checkpoint, [Image.open(BUNDLED_IMAGE)],
                                             ['a diagram', 'a dog', 'a cat'])
    expected = (scale * image @ text.T).softmax(dim=-1)[0].tolist()
    assert runs[0] == runs[1]  # deterministic: drop-path is off
    assert runs[0] == pytest.approx(expected, abs=1e-5)
    assert max(expected) - min(expected) > 1e-3  # the check can tell the labels apart


@pytest.mark.full_size
def test_cifar100_example(tmp_path, g14_checkpoint):
    (tmp_path / 'in_memory_cifar.py').write_text(IN_MEMORY_CIFAR)
    result = _run_example('cifar100_example.py', tmp_path, {
        '/path/to/eva_clip_psz14.pt': repr(str(g14_checkpoint)),
        'from torchvision.datasets import CIFAR100': 'from in_memory_cifar import CIFAR100'})
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line.rsplit(':', 1) for line in result.stdout.splitlines() if line.strip().endswith('%')]
    from PIL import Image
    classes = [f'class {i}' for i in range(99)] + ['snake']
    image, text, _ = _eval_mode_features(g14_checkpoint, [Image.new('RGB', (32, 32), (3637 % 256, 90, 40))],
                                      [f'a photo of a {c}' for c in classes])
    values, indices = (100.0 * image @ text.T).softmax(dim=-1)[0].topk(5)
    assert [name.strip() for name, _ in lines] == [classes[i] for i in indices]
    assert [float(p.strip(' %')) for _, p in lines] == pytest.approx([100 * v for v in values.tolist()], abs=0.006)
