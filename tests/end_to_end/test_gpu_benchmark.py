"""benchmarks/gpu.py (every section: GEMM peak, encode, embed, load) runs on the CPU (--dry-run) with the tiny
model, so the GPU session's one call does not rot."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from support.checkpoints import register_reference

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_dry_run_loads_the_tiny_model(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--dry-run', '--workdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result['device'] == 'cpu (dry run)'
    [load] = result['load']
    assert 'error' not in load, load
    model = open_clip.create_model(register_reference('tiny_a'), precision='bf16')
    assert load['model_bytes'] == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert load['precision'] == 'bf16' and load['file_dtype'] == 'fp32' and load['seconds'] > 0
    assert load['peak_rss'] >= load['import_rss'] > 0
    assert list(tmp_path.iterdir()) == [tmp_path / 'tiny.json']  # generated checkpoints and shards are removed
    assert result['gemm']['flop_per_s'] > 0 and set(result['seconds']) == {'gemm', 'encode', 'embed', 'load'}
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval().encode_image(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16))
    encode = result['encode']
    assert [(e['batch'], e['compiled']) for e in encode] == [(2, False), (4, False), (2, True), (4, True)]
    for e in encode:
        assert e['flop_per_image'] == counter.get_total_flops() > 0 and e['images_per_s'] > 0
        reached = e['images_per_s'] * e['flop_per_image'] / result['gemm']['flop_per_s']
        assert e['peak_fraction'] == pytest.approx(reached)
    [embed] = result['embed']
    assert embed['model'] == 'tiny' and embed['images_per_s'] > 0 and embed['encode_only_images_per_s'] > 0
    assert embed['ratio'] == pytest.approx(embed['images_per_s'] / embed['encode_only_images_per_s'])
