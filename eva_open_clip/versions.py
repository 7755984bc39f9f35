"""What the installed open_clip and timm can do: the one place that knows their versions.

eva_open_clip supports open_clip_torch 2.24 to 3.x and timm 1.0.3 to 1.x. Features that an older
release lacks raise `UnsupportedVersion`, naming the release that has them, instead of failing deep
inside open_clip or timm.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any

import open_clip
import timm
from timm.models.eva import Eva


class UnsupportedVersion(RuntimeError):
    """A feature that the installed open_clip or timm release does not have."""


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split('+')[0].split('.')[:3]:
        digits = ''.join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


OPEN_CLIP = _version(open_clip.__version__)
TIMM = _version(timm.__version__)


@functools.lru_cache(maxsize=None)
def _eva_parameters() -> dict[str, Any]:
    return {k: p.default for k, p in inspect.signature(Eva.__init__).parameters.items() if k != 'self'}


def eva_kwargs(kwargs: dict[str, Any], timm_name: str) -> dict[str, Any]:
    """`kwargs` for timm's `Eva`, leaving out settings this timm lacks while they hold the default.

    A setting that changes the model and that this timm lacks is an `UnsupportedVersion` error.
    """
    known = _eva_parameters()
    out = {}
    for key, value in kwargs.items():
        if key in known:
            out[key] = value
        elif value not in (0, None, False):
            raise UnsupportedVersion(
                f"the EVA image tower '{timm_name}' needs timm's Eva argument '{key}' ({key}={value!r}), "
                f"which timm {timm.__version__} lacks; upgrade timm (pip install 'timm>=1.0.31')")
    return out


def require_open_clip(feature: str, version: tuple[int, ...]) -> None:
    """Raise `UnsupportedVersion` unless the installed open_clip is at least `version`."""
    if OPEN_CLIP < version:
        needed = '.'.join(map(str, version))
        raise UnsupportedVersion(f'{feature} needs open_clip_torch >= {needed} '
                                 f'(installed: {open_clip.__version__})')
