"""Zero-shot classification of image files against text labels (the `classify` command's work)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from eva_open_clip.errors import ToolError, UsageError, param
from eva_open_clip.runtime.choice import DEFAULT_MODEL

BUNDLED_IMAGE = Path(__file__).resolve().parent / 'assets' / 'CLIP.png'  # the original README's image
README_LABELS = ('a diagram', 'a dog', 'a cat')


def check_template(template: str) -> None:
    """A template holds one `{}` where the label goes, and no other braces."""
    try:
        filled = template.format('LABEL')
    except (IndexError, KeyError, ValueError):
        filled = None
    if filled is None or 'LABEL' not in filled:
        raise UsageError(f"{param('template', repr(template))}: write '{{}}' where the label goes (e.g. 'a photo "
                         f"of a {{}}.'); a literal brace is written twice ('{{{{' or '}}}}')")


def image_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, and image files found under folders (recursively, in path order), each once.

    Tar shards are refused: they are `embed`'s inputs."""
    from eva_open_clip.embed.inputs import list_sources
    sources, listing = list_sources([str(p) for p in paths], None)
    if listing.passed.note():
        print(listing.passed.note(), file=sys.stderr)
    shards = [s for s in sources if s.is_shard]
    if shards:
        raise UsageError(f'{shards[0].path} is a tar shard: classify takes image files and folders of them '
                         f'(`eva-open-clip embed` reads shards)')
    return [Path(s.path) for s in sources]


def _decoded(paths: Sequence[Path]) -> tuple[list[Path], list, list[str]]:
    """(decoded paths, their images, paths that could not be decoded), keeping the order."""
    from eva_open_clip.runtime.decode import open_image

    def opened(path: Path):
        try:
            return open_image(path)
        except Exception:  # PIL raises many types for damaged or non-image files
            return None

    pairs = [(p, opened(p)) for p in paths]
    kept = [(p, image) for p, image in pairs if image is not None]
    return [p for p, _ in kept], [image for _, image in kept], [str(p) for p, image in pairs if image is None]


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def classify(images: Sequence[str | os.PathLike] = (), labels: Sequence[str] = README_LABELS, *,
             model: str = DEFAULT_MODEL, pretrained: str | None = None, device: str | None = None,
             precision: str | None = None, template: str = '{}', top_k: int | None = None,
             batch_size: int = 16, compile: bool = False, quantize: str | None = None) -> list[dict]:
    """[{"image": path, "labels": [{"label", "prob"}, ...]}] for image files and folders (the bundled CLIP
    diagram when none are given), most probable first.

    Probabilities are softmax(logit_scale.exp() * cosine similarity) over the labels. Images that cannot
    be decoded are named in a warning; when none can be, it is a `ToolError`. Every argument is checked
    before the model is loaded. `precision` is the device's default when not given (`devices.defaults_for`).
    """
    from eva_open_clip.runtime.choice import ModelChoice
    check_template(template)
    if top_k is not None and top_k < 1:
        raise UsageError(f"{param('top_k')} must be at least 1")
    if not labels:
        raise UsageError('no labels given')
    choice = ModelChoice.checked(model, pretrained, device, precision, quantize, compile)
    paths = image_files(images) if images else [BUNDLED_IMAGE]
    if not paths:
        raise UsageError('no images given')
    from eva_open_clip.runtime.encoder import load_encoder
    encoder = load_encoder(choice.resolved(), batch_size)
    text = encoder.texts([template.format(label) for label in labels])
    scale = encoder.logit_scale()
    k = min(top_k or len(labels), len(labels))
    results, skipped = [], []
    for chunk in _batches(paths, batch_size):
        kept, decoded, failed = _decoded(chunk)
        skipped += failed
        if not kept:
            continue
        probs = (scale * encoder.images(decoded) @ text.T).softmax(dim=-1)
        for path, row in zip(kept, probs):
            values, indices = row.topk(k)
            results.append({'image': str(path), 'labels': [
                {'label': labels[i], 'prob': float(v)} for v, i in zip(values.tolist(), indices.tolist())]})
    if not results:
        raise ToolError(f'none of the {len(paths)} image(s) could be decoded, e.g. {skipped[0]}')
    if skipped:
        print(f'warning: skipped {len(skipped)} file(s) that could not be decoded: {", ".join(skipped)}',
              file=sys.stderr)
    return results
