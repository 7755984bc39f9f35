"""The GPU benchmark, in one call that prints one JSON object.

    python benchmarks/gpu.py              # on a machine with a GPU (a few minutes; about 40 GB of disk)
    python benchmarks/gpu.py --dry-run    # on the CPU with the tiny reference model (tests run this)

Sections:

- `load`: loading straight to the GPU (`create_model_and_transforms(..., device='cuda')`, each tensor
  created on the GPU from the read-only mapped file) for EVA_CLIP_g_14 from an fp16 file and
  EVA-CLIP-8B from an fp32 file, both to bf16: seconds, peak GPU memory against the model's bytes, peak
  host RSS. The files are generated in the released layout (every key and shape of the manifests) and
  removed afterwards; each load runs in a fresh process (`bench_large_load.child_load`).

With --dry-run every section runs on the CPU with the tiny reference architecture (tests/data/tiny_a),
so the script is exercised by the test suite and does not rot between GPU sessions.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_large_load import DTYPES, manifest, write_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / 'tests' / 'data' / 'tiny_a'
LOAD_CASES = [('EVA_CLIP_g_14', 'fp16', 'bf16'), ('EVA-CLIP-8B', 'fp32', 'bf16')]


def _tiny(workdir: Path) -> tuple[Path, dict[str, list[int]]]:
    """The tiny reference architecture's config file, and its checkpoint's keys and shapes."""
    config = workdir / 'tiny.json'
    config.write_text(json.dumps(torch.load(TINY / 'golden.pt', weights_only=True)['config']))
    packed = torch.load(TINY / 'checkpoint_packed.pt', weights_only=True)
    shapes = {k: list(v.shape) for k, v in packed['tensors'].items()}
    shapes['text.token_embedding.weight'] = list(packed['embedding_shape'])
    return config, {k: shapes[k] for k in packed['keys'] if '.rope.' not in k}


def _load(name: str, precision: str, checkpoint: Path, device: str, config: Path | None) -> dict:
    args = [name, precision, str(checkpoint), device, '1'] + ([str(config)] if config else [])
    out = subprocess.run([sys.executable, str(ROOT / 'benchmarks' / 'bench_large_load.py'), '--child', *args],
                         capture_output=True, text=True)
    if out.returncode:
        return dict(model=name, error=(out.stderr.strip().splitlines() or ['killed'])[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_section(workdir: Path, dry_run: bool) -> list[dict]:
    """Load each case's generated file straight to the device, in a fresh process each."""
    device = 'cpu' if dry_run else 'cuda'
    cases = [('tiny', 'fp32', 'bf16')] if dry_run else LOAD_CASES
    config, tiny_shapes = _tiny(workdir) if dry_run else (None, None)
    runs = []
    for name, file_dtype, precision in cases:
        checkpoint = workdir / f'{name}.{file_dtype}.pt'
        start = time.perf_counter()
        size = write_checkpoint(checkpoint, tiny_shapes if dry_run else manifest(name), DTYPES[file_dtype])
        written = time.perf_counter() - start
        run = _load(name, precision, checkpoint, device, config)
        checkpoint.unlink()
        runs.append(dict(run, file_dtype=file_dtype, file_bytes=size, write_s=written))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--dry-run', action='store_true', help='the tiny model on the CPU')
    parser.add_argument('--workdir', help='where generated files go (default: a temporary folder)')
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit('gpu.py: no CUDA device here; use --dry-run to exercise it on the CPU')
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix='eva-gpu-bench-'))
    workdir.mkdir(parents=True, exist_ok=True)
    device = 'cpu (dry run)' if args.dry_run else torch.cuda.get_device_name()
    result = dict(device=device, torch=torch.__version__, load=load_section(workdir, args.dry_run))
    print(json.dumps(result))


if __name__ == '__main__':
    main()
