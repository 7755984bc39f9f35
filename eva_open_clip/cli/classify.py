"""`eva-open-clip classify`: zero-shot classification of images against text labels."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from PIL import Image

from eva_open_clip.cli.checks import check_template
from eva_open_clip.embed import inputs
from eva_open_clip.embed.decode import open_image
from eva_open_clip.embed.encoder import Encoder
from eva_open_clip.errors import ToolError, UsageError

BUNDLED_IMAGE = Path(__file__).resolve().parent.parent / 'assets' / 'CLIP.png'  # the original README's image
README_LABELS = ('a diagram', 'a dog', 'a cat')


def read_labels(labels: Sequence[str] | None, labels_file: str | None) -> list[str]:
    """Labels from the command line and/or a file (one per line); the original example's by default."""
    found = list(labels or [])
    if labels_file:
        try:
            text = Path(labels_file).read_text(encoding='utf-8')
        except OSError as e:
            raise UsageError(f'--labels-file {labels_file}: {e.strerror or e}') from None
        except UnicodeDecodeError:
            raise UsageError(f'--labels-file {labels_file}: not UTF-8 text') from None
        found += [line.strip() for line in text.splitlines() if line.strip()]
    if not found and labels is None and labels_file is None:
        return list(README_LABELS)
    if not found:
        raise UsageError(f'--labels-file {labels_file}: holds no label' if labels_file else 'no labels given')
    return found


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found under folders (recursively, in path order), each once.

    Tar shards are refused: they are `embed`'s inputs."""
    sources, _ = inputs.unique_sources(inputs.input_sources([str(p) for p in paths], None))
    shards = [s for s in sources if s.is_shard]
    if shards:
        raise UsageError(f'{shards[0].path} is a tar shard: classify takes image files and folders of them '
                         f'(`eva-open-clip embed` reads shards)')
    return [Path(s.path) for s in sources]


def _opened(path: Path) -> Image.Image | None:
    try:
        return open_image(path)
    except Exception:  # PIL raises many types for damaged or non-image files
        return None


def decode(paths: Sequence[Path]) -> tuple[list[Path], list[Image.Image], list[str]]:
    """(decoded paths, their images, paths that could not be decoded), keeping the order."""
    opened = [(p, _opened(p)) for p in paths]
    kept = [(p, image) for p, image in opened if image is not None]
    return [p for p, _ in kept], [image for _, image in kept], [str(p) for p, image in opened if image is None]


def warn_skipped(skipped: Sequence[str]) -> None:
    if skipped:
        print(f'warning: skipped {len(skipped)} file(s) that could not be decoded: {", ".join(skipped)}',
              file=sys.stderr)


def batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def classify(encoder: Encoder, paths: Sequence[Path], labels: list[str], template: str = '{}',
             top_k: int | None = None, batch_size: int = 16) -> list[dict]:
    """[{"image": path, "labels": [{"label", "prob"}, ...]}] for image files, most probable first.

    Probabilities are softmax(logit_scale.exp() * cosine similarity) over the labels. Images that
    cannot be decoded are named in a warning; when none can be, it is a `ToolError`.
    """
    check_template(template)
    if not paths:
        raise UsageError('no images given')
    text = encoder.texts([template.format(label) for label in labels])
    scale = encoder.logit_scale()
    k = min(top_k or len(labels), len(labels))
    results, skipped = [], []
    for chunk in batches(paths, batch_size):
        kept, images, failed = decode(chunk)
        skipped += failed
        if not kept:
            continue
        probs = (scale * encoder.images(images) @ text.T).softmax(dim=-1)
        for path, row in zip(kept, probs):
            values, indices = row.topk(k)
            results.append({'image': str(path), 'labels': [
                {'label': labels[i], 'prob': float(v)} for v, i in zip(values.tolist(), indices.tolist())]})
    if not results:
        raise ToolError(f'none of the {len(paths)} image(s) could be decoded, e.g. {skipped[0]}')
    warn_skipped(skipped)
    return results


def format_table(results: list[dict]) -> str:
    """One small table per image."""
    blocks = []
    for result in results:
        width = max(len(entry['label']) for entry in result['labels'])
        rows = [f"  {entry['label']:<{width}}  {entry['prob']:7.2%}" for entry in result['labels']]
        blocks.append('\n'.join([result['image'], *rows]))
    return '\n\n'.join(blocks)


def print_results(results: list[dict], as_json: bool) -> None:
    print(json.dumps(results, indent=2) if as_json else format_table(results))
