"""Shared fixtures: reference checkpoints in the released layout and their golden outputs."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import eva_open_clip
from eva_open_clip import versions

DATA = Path(__file__).parent / 'data'
REFERENCE_CASES = ('tiny_a', 'e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a')
G14_VALUES = 1_136_435_841


def needs_open_clip(version: tuple[int, ...], feature: str):
    """Skip where the installed open_clip lacks `feature` (tests/test_versions.py checks its error there)."""
    return pytest.mark.skipif(versions.OPEN_CLIP < version, reason=f"{feature} needs open_clip_torch >= "
                              f"{'.'.join(map(str, version))} (installed: {versions.OPEN_CLIP_VERSION})")


def needs_timm(version: tuple[int, ...], feature: str):
    """Skip where the installed timm lacks `feature` (tests/test_versions.py checks its error there)."""
    return pytest.mark.skipif(versions.TIMM < version, reason=f"{feature} needs timm >= "
                              f"{'.'.join(map(str, version))} (installed: {versions.TIMM_VERSION})")


def released_state_dict(case: str) -> dict[str, torch.Tensor]:
    """The reference checkpoint of `case`, key for key and dtype for dtype as released.

    The committed copy keeps only the token-embedding rows that the golden captions use (the rest
    cannot affect any golden output); the other rows are zero.
    """
    packed = torch.load(DATA / case / 'checkpoint_packed.pt', weights_only=True)
    values = packed['embedding_values']
    embedding = torch.zeros(packed['embedding_shape'], dtype=values.dtype)
    embedding[packed['embedding_rows']] = values
    tensors = dict(packed['tensors'], **{'text.token_embedding.weight': embedding})
    return {k: tensors[k] for k in packed['keys']}


def golden(case: str) -> dict:
    return torch.load(DATA / case / 'golden.pt', weights_only=True)


def model_name(case: str) -> str:
    """Registers the reference architecture of `case` under a test name and returns that name."""
    name = f'test-{case}'
    eva_open_clip.register_eva_model(name, golden(case)['config'])
    return name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over max abs value, the parity measure of the acceptance tests."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny_a written as a released `.pt` file (bare fp16 state dict)."""
    path = tmp_path_factory.mktemp('tiny') / 'checkpoint.pt'
    torch.save(released_state_dict('tiny_a'), path)
    return path


def manifest(name: str) -> dict[str, list[int]]:
    """Key -> shape of a released checkpoint (buffers included for EVA-CLIP repository files)."""
    raw = json.loads((DATA / 'manifests' / f'{name}.manifest.json').read_text())
    return {k: (v['shape'] if isinstance(v, dict) else v) for k, v in raw.items()}


def random_checkpoint(shapes: dict[str, list[int]], dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint with the given keys and shapes, filled with small random values."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        if key.endswith('logit_scale'):
            t.fill_(4.6052)
        elif key.endswith(('norm1.weight', 'norm2.weight', 'norm.weight', 'ln_1.weight', 'ln_2.weight',
                           'ln_final.weight', '_ln.weight')):
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02, generator=gen)
        sd[key] = t.to(dtype)
    return sd


def eva_clip_rope_tables(head_dim: int, grid: int, pt_seq_len: int = 16, theta: float = 10000.0):
    """The EVA-CLIP code's rotary tables (cos, sin), each [grid*grid, head_dim], computed from its formula.

    Half the head dimension rotates with the row, half with the column; frequencies are interleaved
    pairs and positions are interpolated from the `pt_seq_len` grid the model was trained on.
    """
    dim = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2)[:dim // 2].float() / dim)
    t = torch.arange(grid).float() / grid * pt_seq_len
    freqs = torch.repeat_interleave(torch.outer(t, freqs), 2, dim=-1)  # [grid, dim]
    rows = freqs[:, None, :].expand(grid, grid, dim)
    cols = freqs[None, :, :].expand(grid, grid, dim)
    table = torch.cat([rows, cols], dim=-1).reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


@pytest.fixture(scope='session')
def g14_checkpoint(tmp_path_factory) -> Path:
    """A full-size EVA_CLIP_g_14 checkpoint: every released key and shape, fp16, random values."""
    shapes = manifest('EVA_CLIP_g_14')
    assert len(shapes) == 678 and sum(math.prod(s) for s in shapes.values()) == G14_VALUES
    path = tmp_path_factory.mktemp('g14') / 'eva_clip_psz14.pt'
    torch.save(random_checkpoint(shapes, dtype=torch.float16), path)
    return path


@pytest.fixture(scope='session')
def b16_checkpoint(tmp_path_factory) -> Path:
    """A full-size EVA02-CLIP-B-16 checkpoint (fp16, random values, true rotary tables)."""
    from test_family import full_size_checkpoint
    path = tmp_path_factory.mktemp('b16') / 'EVA02_CLIP_B_psz16_s8B.pt'
    torch.save(full_size_checkpoint('EVA02-CLIP-B-16'), path)
    return path


@pytest.fixture(scope='session')
def tiny(tmp_path_factory):
    """tiny_a as files for the command line (config and checkpoint), and its open_clip model, transform, tokenizer."""
    import open_clip
    folder = tmp_path_factory.mktemp('tiny-cli')
    (folder / 'tiny.json').write_text(json.dumps(golden('tiny_a')['config']))
    torch.save(released_state_dict('tiny_a'), folder / 'tiny.pt')
    model, _, preprocess = open_clip.create_model_and_transforms(model_name('tiny_a'), pretrained=str(folder / 'tiny.pt'))
    return folder, model.eval(), preprocess, open_clip.get_tokenizer(model_name('tiny_a'))
