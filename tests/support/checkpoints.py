"""Reference checkpoints in the released layouts, their golden outputs, full-size random checkpoints, and
the skips for features an installed release lacks."""
from __future__ import annotations

import contextlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Iterator

import pytest
import torch

import eva_open_clip
from eva_open_clip import versions
from eva_open_clip.registry import model_configs_dir

DATA = Path(__file__).resolve().parent.parent / 'data'
REFERENCE_CASES = ('tiny_a', 'e02_tiny_a', 'epost_tiny_a', 'rms_tiny_a', 'rmspost_tiny_a')
# the PuLID-style depth-24, 336-px EVA02 model (tests/plugin/test_eva_clip_api.py); not one of the cases above
DEEP_CASE = 'e02_deep_tiny_a'
G14_VALUES = 1_136_435_841


def needs_open_clip(version: tuple[int, ...], feature: str):
    """Skip where the installed open_clip lacks `feature` (tests/test_versions.py checks its error there)."""
    return pytest.mark.skipif(not versions.open_clip_at_least(version), reason=f"{feature} needs open_clip_torch >= "
                              f"{'.'.join(map(str, version))} (installed: {versions.OPEN_CLIP_VERSION})")


def needs_timm(version: tuple[int, ...], feature: str):
    """Skip where the installed timm lacks `feature` (tests/test_versions.py checks its error there)."""
    return pytest.mark.skipif(not versions.timm_at_least(version), reason=f"{feature} needs timm >= "
                              f"{'.'.join(map(str, version))} (installed: {versions.TIMM_VERSION})")


def needs_int8():
    """Skip where `quantize='int8'` cannot run (tests/plugin/test_quantize.py checks its error there)."""
    from eva_open_clip.quantize import TORCH
    missing = importlib.util.find_spec('torchao') is None or not versions.at_least(versions.TORCH, TORCH)
    return pytest.mark.skipif(missing, reason="quantize='int8' needs torch >= 2.6 and torchao (the int8 extra)")


def needs_trainer():
    """Skip where open_clip's trainer cannot run: its dependencies come with the `train` extra."""
    missing = [m for m in ('pandas', 'fsspec') if importlib.util.find_spec(m) is None]
    return pytest.mark.skipif(bool(missing), reason=f"open_clip's trainer needs {', '.join(missing)}: "
                                                    f"pip install 'eva_open_clip[train]'")


def released_state_dict(case: str) -> dict[str, torch.Tensor]:
    """The reference checkpoint of `case`, key for key and dtype for dtype as released.

    The committed copy keeps only the token-embedding rows that the golden captions use (the rest
    cannot affect any golden output); the other rows are zero. Where it says `rope_recomputed`, the rotary
    tables (every one the same) are computed again from the config: the file's, rounded to fp16, exactly.
    """
    packed = torch.load(DATA / case / 'checkpoint_packed.pt', weights_only=True)
    values = packed['embedding_values']
    embedding = torch.zeros(packed['embedding_shape'], dtype=values.dtype)
    embedding[packed['embedding_rows']] = values
    tensors = dict(packed['tensors'], **{'text.token_embedding.weight': embedding})
    if packed.get('rope_recomputed'):
        v = golden(case)['config']['vision_cfg']
        cos, sin = eva_clip_rope_tables(v['head_width'], v['image_size'] // v['patch_size'], v['pt_hw_seq_len'])
        tensors.update({k: (cos if k.endswith('cos') else sin).half() for k in packed['keys'] if '.rope.' in k})
    return {k: tensors[k] for k in packed['keys']}


def golden(case: str) -> dict:
    return torch.load(DATA / case / 'golden.pt', weights_only=True)


def register_reference(case: str) -> str:
    """Register the reference architecture of `case` under its test name (`test-CASE`; again: nothing changes)
    and return that name."""
    name = f'test-{case}'
    eva_open_clip.register_eva_model(name, golden(case)['config'])
    return name


@contextlib.contextmanager
def registered(name: str, config) -> Iterator[str]:
    """`name` registered with `config` inside the block, and unregistered after it."""
    eva_open_clip.register_eva_model(name, config)
    try:
        yield name
    finally:
        eva_open_clip.unregister_eva_model(name)


def fake_hub_cache(cache: Path, hub_file: str, content: bytes) -> Path:
    """A Hugging Face hub cache holding one file ('org/repo/file'), in huggingface_hub's layout."""
    repo, _, name = hub_file.rpartition('/')
    snapshot = cache / f'models--{repo.replace("/", "--")}' / 'snapshots' / 'c0ffee'
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('c0ffee')
    (snapshot / name).write_bytes(content)
    return snapshot / name


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max abs difference over max abs value, the parity measure of the acceptance tests."""
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


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


def synthetic_checkpoint(shapes: dict[str, list[int]], dtype=torch.float16, seed: int = 0) -> dict[str, torch.Tensor]:
    """A checkpoint whose activations depend on the input, as the reference checkpoints were made: matrices
    N(0, 1) / sqrt(fan_in), norm weights 1 + 0.1 N, biases and embeddings 0.02 N, positional embeddings 0.01 N,
    the text projection N / sqrt(its first dimension), the logit scale log(100)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        t = torch.empty(shape, dtype=torch.float32)
        if key.endswith('logit_scale'):
            t.fill_(4.6052)
        elif key.endswith('text_projection'):
            t.normal_(0, 1, generator=gen).div_(shape[0] ** 0.5)
        elif key.endswith('positional_embedding'):
            t.normal_(0, 0.01, generator=gen)
        elif ('norm' in key or 'ln' in key) and key.endswith('.weight'):
            t.normal_(0, 0.1, generator=gen).add_(1.0)
        elif len(shape) >= 2 and 'embed' not in key and 'token' not in key:
            t.normal_(0, 1, generator=gen).div_(math.prod(shape[1:]) ** 0.5)
        else:  # biases, q/v biases, the class token, patch and token embeddings
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


def full_size_checkpoint(name: str, dtype=torch.float16) -> dict[str, torch.Tensor]:
    """Every key and shape of the released file of model `name`, random values, true rotary tables (if it has any)."""
    shapes = manifest(name)
    sd = random_checkpoint({k: s for k, s in shapes.items() if '.rope.' not in k}, dtype=dtype)
    rope = [key for key in shapes if '.rope.' in key]
    if rope:  # EVA02 and later
        cfg = json.loads((model_configs_dir() / f'{name}.json').read_text())['vision_cfg']
        cos, sin = eva_clip_rope_tables(cfg['head_width'], cfg['image_size'] // cfg['patch_size'], cfg['pt_hw_seq_len'])
        for key in rope:
            sd[key] = (cos if key.endswith('cos') else sin).to(dtype)
    return {k: sd[k] for k in shapes}
