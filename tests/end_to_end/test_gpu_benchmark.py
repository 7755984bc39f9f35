"""benchmarks/gpu.py runs every section on the CPU (--dry-run) with the tiny model, printing one line per
measurement as it is made and one as each section ends, so that the GPU session's one call does not rot."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import torch

from support.checkpoints import register_reference

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / 'benchmarks'))


def test_gpu_benchmark_dry_run_prints_every_measurement(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'gpu.py'), '--dry-run', '--workdir', str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    runs: dict[str, list[dict]] = {}
    ended = []
    for line in out.stdout.strip().splitlines():
        record = json.loads(line)
        section = record.pop('section')
        if record.pop('end', False):
            ended.append(section)
            assert 'error' not in record, (section, record)
        else:
            runs.setdefault(section, []).append(record)
    assert ended == ['tests', 'gemm', 'encode', 'decode', 'embed', 'large', 'compile', 'train', 'giant']
    assert list(runs) == ['machine', 'tests', 'gemm', 'encode', 'decode', 'embed', 'large', 'compile', 'train', 'giant',
                          'done']
    assert runs['machine'][0]['device'] == 'cpu (dry run)'
    [gemm] = runs['gemm']
    assert gemm['bf16_flop_per_s'] > 0 and gemm['fp32_tf32_flop_per_s'] > 0 and gemm['spec_bf16_flop_per_s'] is None
    model = open_clip.create_model(register_reference('tiny_a'), precision='bf16')
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval().encode_image(torch.randn(1, 3, 56, 56, dtype=torch.bfloat16))
    encode, compiled = runs['encode'], runs['compile']
    assert [(e['precision'], e['batch'], e['compiled']) for e in encode] == \
        [('bf16', 2, False), ('bf16', 4, False), ('fp32 (tf32)', 2, False), ('fp32 (tf32)', 4, False)]
    assert [(e['precision'], e['batch'], e['compiled']) for e in compiled] == \
        [('bf16', 4, True), ('fp32 (tf32)', 4, True)]
    for e in encode + compiled:
        assert e['flop_per_image'] > 0 and e['images_per_s'] > 0 and e['spec_peak_fraction'] is None
        peak = gemm['bf16_flop_per_s'] if e['precision'] == 'bf16' else gemm['fp32_tf32_flop_per_s']
        assert e['peak_fraction'] == pytest.approx(e['images_per_s'] * e['flop_per_image'] / peak)
    assert encode[0]['flop_per_image'] == counter.get_total_flops()
    embed = runs['embed']
    assert [(e['model'], e['decode']) for e in embed] == [('tiny', 'fast'), ('tiny', 'exact')]
    for measured in embed:
        assert measured['ratio'] == pytest.approx(measured['images_per_s'] / measured['encode_only_images_per_s'])
        assert 0 <= measured['gpu_wait_fraction'] <= 1 and measured['images'] == 200
    assert [r['size'] for r in runs['decode']] == ['256x256', '500x375', '1600x1200']
    large = runs['large']
    assert large and all(r['images_per_s'] > 0 and r['load_seconds'] > 0 for r in large)
    trained = [r for r in runs['train'] if 'skipped' not in r]
    lora = importlib.util.find_spec('peft') is not None  # the lora extra (not in the oldest set)
    assert [(r['model'], r['lora'], r['params']['trainable'] < r['params']['total']) for r in trained] == \
        [('tiny', False, False)] + ([('tiny', True, True)] if lora else [])
    assert all(r['samples_per_s'] > 0 for r in trained) and len(runs['train']) == 2
    [giant] = runs['giant']  # FSDP and checkpointing under torchrun (on the CPU: gloo, one process)
    from eva_open_clip import versions
    if versions.at_least(versions.TORCH, versions.FSDP_TORCH):
        assert giant['fsdp'] and giant['grad_checkpointing'] and giant['samples_per_s'] > 0
    else:
        assert giant['skipped'].startswith('--fsdp needs torch >= 2.6')
    assert list(tmp_path.iterdir()) == [tmp_path / 'tiny.json']  # generated checkpoints and shards are removed


def test_each_set_fits_one_call():
    import gpu
    for name, sections in gpu.SETS.items():
        assert sum(gpu.COSTS[s] for s in sections) <= 540 * 0.8, name  # a fifth to spare for start-up and loads
    assert set(gpu.SECTIONS) == {s for sections in gpu.SETS.values() for s in sections}
    assert gpu.spec_peaks('NVIDIA H100 80GB HBM3')[0] == gpu.spec_peaks('NVIDIA H200')[0] == 989e12
    assert gpu.EMBED_PER_SHARD % gpu.EMBED_BATCH == 0 and gpu.EMBED_SHARDS * gpu.EMBED_PER_SHARD // 256 >= 40
