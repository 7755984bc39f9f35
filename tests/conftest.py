"""Shared fixtures: reference checkpoints as files, full-size checkpoints, the tiny model for the command line.

Helpers live in `support/`; this file holds only fixtures, and the hook that keeps the full-size tests on one
pytest-xdist worker and leaves the `gpu` tests out without CUDA."""
from __future__ import annotations

import json
import math
import multiprocessing
import time
from pathlib import Path

import pytest
import torch

from support.checkpoints import (
    G14_VALUES,
    full_size_checkpoint,
    golden,
    manifest,
    random_checkpoint,
    register_reference,
    released_state_dict,
)


@pytest.fixture(scope='session')
def tiny_checkpoint(tmp_path_factory) -> Path:
    """tiny_a written as a released `.pt` file (bare fp16 state dict)."""
    path = tmp_path_factory.mktemp('tiny') / 'checkpoint.pt'
    torch.save(released_state_dict('tiny_a'), path)
    return path


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
    name = register_reference('tiny_a')
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=str(folder / 'tiny.pt'))
    return folder, model.eval(), preprocess, open_clip.get_tokenizer(register_reference('tiny_a'))


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Every process a job starts ends with it: no child that this test process started through multiprocessing
    (decoding workers) is still running a few seconds after a test. (Subprocesses are checked where a test
    starts them.)"""
    yield
    deadline = time.monotonic() + 5
    while (left := multiprocessing.active_children()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left, f'still running after the test: {left}'


def pytest_collection_modifyitems(config, items) -> None:
    """The full-size tests (GBs each) run one after another on one worker, whatever `-n` says (`--dist loadgroup`);
    the `gpu` tests are deselected on a machine without CUDA."""
    for item in items:
        if item.get_closest_marker('full_size'):
            item.add_marker(pytest.mark.xdist_group('full_size'))
    if not torch.cuda.is_available():
        gpu = [item for item in items if item.get_closest_marker('gpu')]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker('gpu')]
