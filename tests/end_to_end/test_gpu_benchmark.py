"""benchmarks/gpu.py runs every section on the CPU (--dry-run) with the tiny model, printing each as it finishes, so
that the GPU session's one call does not rot."""
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


def test_gpu_benchmark_dry_run_prints_every_section(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--dry-run', '--workdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    sections = {}
    for line in out.stdout.strip().splitlines():
        record = json.loads(line)
        sections[record.pop('section')] = record
    assert list(sections) == ['machine', 'gemm', 'encode', 'embed', 'decode', 'large', 'compile', 'done']
    assert all('error' not in s for s in sections.values()), sections
    assert sections['machine']['device'] == 'cpu (dry run)'
    gemm = sections['gemm']
    assert gemm['bf16_flop_per_s'] > 0 and gemm['fp32_tf32_flop_per_s'] > 0
    model = open_clip.create_model(register_reference('tiny_a'), precision='bf16')
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval().encode_image(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16))
    encode = sections['encode']['runs']
    assert [(e['precision'], e['batch'], e['compiled']) for e in encode] == \
        [('bf16', 2, False), ('bf16', 4, False), ('fp32 (tf32)', 2, False), ('fp32 (tf32)', 4, False)]
    compiled = sections['compile']['runs']
    assert [(e['precision'], e['batch'], e['compiled']) for e in compiled] == \
        [('bf16', 4, True), ('fp32 (tf32)', 4, True)]
    for e in encode + compiled:
        assert e['flop_per_image'] > 0 and e['images_per_s'] > 0
        peak = gemm['bf16_flop_per_s'] if e['precision'] == 'bf16' else gemm['fp32_tf32_flop_per_s']
        assert e['peak_fraction'] == pytest.approx(e['images_per_s'] * e['flop_per_image'] / peak)
    assert encode[0]['flop_per_image'] == counter.get_total_flops()
    [embed] = sections['embed']['runs']
    assert embed['model'] == 'tiny' and embed['encode_only_images_per_s'] > 0
    for decode in ('fast', 'exact'):
        measured = embed[decode]
        assert measured['ratio'] == pytest.approx(measured['images_per_s'] / embed['encode_only_images_per_s'])
        assert 0 <= embed[decode]['gpu_wait_fraction'] <= 1
    assert [r['size'] for r in sections['decode']['rows']] == ['256x256', '500x375', '1600x1200']
    large = sections['large']['runs']
    assert large and all(r['images_per_s'] > 0 and r['load_seconds'] > 0 for r in large)
    assert list(tmp_path.iterdir()) == [tmp_path / 'tiny.json']  # generated checkpoints and shards are removed
