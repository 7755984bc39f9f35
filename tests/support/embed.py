"""What the `embed` tests share: shards and images made here, running the command line, reading a folder."""
from __future__ import annotations

import io
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from .checkpoints import register_reference
from .cli import main_here, run_cli

FIXED_FILES = {'embed.json', 'units.jsonl', 'summary.json', '.lock'}
# the tiny model's name: the test name of its architecture (tiny_a) wherever it runs, so that this process
# never holds the architecture under two names (a second fit for its keys)
TINY = 'test-tiny_a'


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def png(i: int, shard: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (30 + i % 17, 24 + i % 11), ((i * 37) % 256, (shard * 60) % 256, (i * 11) % 256)).save(buf, 'PNG')
    return buf.getvalue()


def api_features(tiny, images: list, captions: list | None = None):
    _, model, preprocess, tokenizer = tiny
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(tokenizer(captions), normalize=True) if captions else None
    return image.numpy(), None if text is None else text.numpy()


def embed_command(tiny, *args, out) -> list[str]:
    folder = tiny[0]
    return ['run', '--register', f'{TINY}={folder / "tiny.json"}', '-m', 'eva_open_clip', 'embed',
            *map(str, args), '--out', str(out), '--model', TINY, '--pretrained', str(folder / 'tiny.pt')]


def run_embed(tiny, *args, out, launcher=None, background=False, new_process=False):
    """`eva-open-clip embed ARGS --out OUT` on the tiny model: in this process (`embed_here`, seconds fewer),
    or in a new one for `new_process`, `background` or a `launcher` (e.g. torchrun)."""
    if launcher or background or new_process:
        return run_cli(*embed_command(tiny, *args, out=out), launcher=launcher, background=background)
    return embed_here(tiny, *args, out=out)


def embed_here(tiny, *args, out, pretrained: str | None = None) -> subprocess.CompletedProcess:
    """`eva-open-clip embed ARGS --out OUT` on the tiny model, in this process (`main_here`)."""
    register_reference('tiny_a')
    return main_here('embed', *args, '--out', out, '--model', TINY, '--pretrained', pretrained or tiny[0] / 'tiny.pt')


def read_folder(out: Path) -> dict[str, dict]:
    """Every row of an output folder, by key: image/text features and metadata; checks alignment and uniqueness."""
    rows = {}
    for meta_path in sorted((out / 'metadata').glob('metadata_*.parquet')):
        n = meta_path.stem.split('_')[1]
        meta = pq.read_table(meta_path).to_pylist()
        image = np.load(out / 'img_emb' / f'img_emb_{n}.npy')
        text_path = out / 'text_emb' / f'text_emb_{n}.npy'
        text = np.load(text_path) if text_path.exists() else None
        assert image.dtype == np.float32 and len(image) == len(meta) and (text is None or len(text) == len(meta))
        for i, row in enumerate(meta):
            assert row['image_path'] not in rows, f"{row['image_path']} twice"
            rows[row['image_path']] = dict(row, image=image[i], text=None if text is None else text[i], part=n)
    return rows


def same_output(a: Path, b: Path) -> None:
    """Two folders hold the same files with the same content (summaries and lock files aside)."""
    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob('*') if p.is_file()
                      and p.name not in ('summary.json', '.lock'))
    assert files(a) == files(b)
    for name in files(a):
        if name.endswith('.npy'):
            assert np.array_equal(np.load(a / name), np.load(b / name)), name
        elif name.endswith('.parquet'):
            assert pq.read_table(a / name).equals(pq.read_table(b / name)), name
        else:
            assert (a / name).read_text() == (b / name).read_text(), name


def _fields(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ('image', 'text', 'part', 'similarity')}


def same_rows(a: Path, b: Path) -> dict[str, dict]:
    """Every sample of `b` is in `a` exactly once, with the same features and metadata (any part); returns `a`'s rows.

    Features are compared to 1e-6: a row encoded in a batch of other samples may differ in the last bits.
    """
    rows_a, rows_b = read_folder(a), read_folder(b)
    assert sorted(rows_a) == sorted(rows_b)
    for key, row in rows_a.items():
        other = rows_b[key]
        assert np.allclose(row['image'], other['image'], atol=1e-6), key
        assert (row['text'] is None) == (other['text'] is None), key
        assert row['text'] is None or np.allclose(row['text'], other['text'], atol=1e-6), key
        assert _fields(row) == _fields(other), key
        assert row.get('similarity') == other.get('similarity') or abs(row['similarity'] - other['similarity']) < 1e-6
    return rows_a


def no_strays(out: Path) -> None:
    """The folder holds exactly its fixed files, its unit records and the files they name: no orphan, no temp file."""
    import json
    named = {'shards/' + p.name for p in (out / 'shards').iterdir()}
    for record in (out / 'shards').iterdir():
        named.update(f for part in json.loads(record.read_text())['parts'] for f in part['files'])
    found = {str(p.relative_to(out)) for p in out.rglob('*') if p.is_file()}
    assert found - FIXED_FILES == named, found ^ (named | FIXED_FILES)
