"""Peak memory of `embed` over decompression bombs (tiny files of huge or thin pictures) against a normal run.

    python benchmarks/bench_embed_memory.py        # about 2 minutes on 2 cores

A shard of 200 ordinary JPEGs, alone and followed by a shard of small PNGs of 1x10000, 10000x1, 2x20000,
12000x12000 (grey) and 10000x10000 pictures, embedded with the tiny reference model at 224 px (the
released models' size: a thin strip resizes to 224 x millions), decoding in the main process
(`--workers 0`, so one process holds all of it). Three runs, each a fresh process: the ordinary shard;
both shards with the default pixel limits (the pictures are skipped as `image_too_large` from their
headers); both shards with the limits lifted, which is what decoding them costs. Prints each run's peak
RSS and its difference from the ordinary run (goal: within 100 MB with the limits).
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_embed import make_shards  # noqa: E402  (also puts tests/ on the path)

BOMBS = {'thin_1x10000': ('L', (1, 10000)), 'thin_10000x1': ('L', (10000, 1)), 'thin_2x20000': ('RGB', (2, 20000)),
         'grey_12000x12000': ('L', (12000, 12000)), 'rgb_10000x10000': ('RGB', (10000, 10000))}


def run_embed(inputs: list[str], out: Path, register: list[str], options: list[str]) -> dict:
    """One `embed` process in the main process only: its rows, skipped samples by reason and peak RSS."""
    cmd = [sys.executable, '-m', 'eva_open_clip', *register, 'embed', *inputs, '--out', str(out), *options,
           '--workers', '0']
    result = subprocess.run(['/usr/bin/time', '-f', 'MAXRSS %M', *cmd], capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(result.stderr[-2000:])
    summary = json.loads((out / 'summary.json').read_text())
    return dict(rows=summary['rows'], skipped=summary['skipped_by_reason'],
                peak_rss=int(re.search(r'MAXRSS (\d+)', result.stderr).group(1)) * 1024)


def tiny_224(folder: Path) -> tuple[list[str], list[str]]:
    """The tiny reference architecture at 224 px (its position embedding widened to 16x16 patches)."""
    from support.checkpoints import golden, released_state_dict
    config = golden('tiny_a')['config']
    config['vision_cfg']['image_size'] = 224
    state = released_state_dict('tiny_a')
    width = state['visual.pos_embed'].shape[-1]
    state['visual.pos_embed'] = torch.randn(1, 16 * 16 + 1, width, dtype=state['visual.pos_embed'].dtype) * 0.02
    (folder / 'tiny224.json').write_text(json.dumps(config))
    torch.save(state, folder / 'tiny224.pt')
    return (['run', '--register', f'tiny224={folder / "tiny224.json"}', '-m', 'eva_open_clip'],
            ['--model', 'tiny224', '--pretrained', str(folder / 'tiny224.pt')])


def bomb_shard(path: Path) -> None:
    with tarfile.open(path, 'w') as tf:
        for key, (mode, size) in BOMBS.items():
            buf = io.BytesIO()
            Image.new(mode, size, 90).save(buf, 'PNG')
            info = tarfile.TarInfo(f'{key}.png')
            info.size = buf.tell()
            buf.seek(0)
            tf.addfile(info, buf)
            print(f'  {key}: {info.size / 1e3:.1f} kB file', flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        register, model = tiny_224(work)
        (work / 'normal').mkdir()
        normal = make_shards(work / 'normal', 200, per_shard=200)
        bomb_shard(work / 'bombs.tar')
        lifted = ['--max-image-pixels', str(10 ** 12), '--max-resized-pixels', str(10 ** 12)]
        runs = {'ordinary images': ([normal], model),
                'with the bombs, default limits': ([normal, str(work / 'bombs.tar')], model),
                'with the bombs, limits lifted': ([normal, str(work / 'bombs.tar')], model + lifted)}
        results = {}
        for name, (inputs, options) in runs.items():
            results[name] = run_embed(inputs, work / f'out-{len(results)}', register, options)
        base = results['ordinary images']['peak_rss']
        print('\nmodel: tiny reference architecture at 224 px, --workers 0 (peak RSS of the one process)')
        for name, r in results.items():
            print(f"{name:32s} rows {r['rows']:4d}  peak RSS {r['peak_rss'] / 2 ** 20:7.0f} MB  "
                  f"(+{(r['peak_rss'] - base) / 2 ** 20:.0f} MB)  skipped {r['skipped'] or 'none'}")
        print(json.dumps({k: dict(peak_rss_mb=round(v['peak_rss'] / 2 ** 20), rows=v['rows'])
                          for k, v in results.items()}))


if __name__ == '__main__':
    main()
