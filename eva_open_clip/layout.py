"""The released EVA-CLIP checkpoint layout and its mapping onto the open_clip model's keys.

Released files (EVA-01 `eva_clip_psz14.pt` and the EVA-CLIP repository's EVA01/EVA02 files) keep the
image tower under `visual.` with the EVA-CLIP module names; open_clip wraps the timm `Eva` trunk as
`visual.trunk.`. The text tower already uses open_clip's names. The mapping, per key:

| released                                   | open_clip                                   |
| ------------------------------------------ | ------------------------------------------- |
| `visual.<k>`                               | `visual.trunk.<k>`                          |
| `visual.blocks.N.attn.inner_attn_ln.*`     | `visual.trunk.blocks.N.attn.norm.*`         |
| `visual.blocks.N.mlp.ffn_ln.*`             | `visual.trunk.blocks.N.mlp.norm.*`          |
| `visual.blocks.N.mlp.w1/w2/w3.*` (SwiGLU)  | `visual.trunk.blocks.N.mlp.fc1_g/fc1_x/fc2.*` |
| `visual.blocks.N.attn.q_bias/v_bias` (with separate q/k/v projections) | `...attn.q_proj.bias/v_proj.bias` |
| `visual.rope.*`, `visual.blocks.N.attn.rope.*` (fixed rotary tables) | dropped: recomputed by timm |
| `text.logit_scale` (EVA-01) or `logit_scale` | `logit_scale`                             |
| `text.*`                                   | `text.*`                                    |
"""
from __future__ import annotations

import re
from typing import Mapping, TypeVar

V = TypeVar('V')

_NESTING_KEYS = ('state_dict', 'model', 'module')
_MODULE_PREFIX = 'module.'
_ROPE_KEY = re.compile(r'^visual\.(blocks\.\d+\.attn\.)?rope\.')
# (released, open_clip) fragments inside `visual.` keys; each maps one way and back.
_RENAMES = (
    ('.attn.inner_attn_ln.', '.attn.norm.'),
    ('.mlp.ffn_ln.', '.mlp.norm.'),
)
_SWIGLU_RENAMES = (('.mlp.w1.', '.mlp.fc1_g.'), ('.mlp.w2.', '.mlp.fc1_x.'), ('.mlp.w3.', '.mlp.fc2.'))
_SEPARATE_QKV_BIAS = (('.attn.q_bias', '.attn.q_proj.bias'), ('.attn.v_bias', '.attn.v_proj.bias'))


def unwrap_state_dict(obj: Mapping[str, V]) -> dict[str, V]:
    """Take the state dict out of a checkpoint as the original EVA-CLIP loader did.

    Accepts a bare state dict or one nested under `state_dict`, `model` or `module`, with or without
    a `module.` prefix on every key.
    """
    sd = obj
    while True:
        nested = [k for k in _NESTING_KEYS if isinstance(sd.get(k), Mapping)]
        if not nested:
            break
        sd = sd[nested[0]]
    sd = dict(sd)
    if sd and all(k.startswith(_MODULE_PREFIX) for k in sd):
        sd = {k[len(_MODULE_PREFIX):]: v for k, v in sd.items()}
    return sd


def is_released_layout(keys) -> bool:
    """True when keys carry the released EVA-CLIP signature (image tower directly under `visual.`)."""
    keys = set(keys)
    return 'visual.patch_embed.proj.weight' in keys and not any(k.startswith('visual.trunk.') for k in keys)


def is_rotary_table(key: str) -> bool:
    """True for the fixed rotary tables EVA02 files store (`visual.rope.*`, `visual.blocks.N.attn.rope.*`)."""
    return bool(_ROPE_KEY.match(key))


def to_open_clip_key(key: str, separate_qkv: bool) -> str | None:
    """The open_clip name of one released key, or None for keys that are recomputed (rotary tables)."""
    if key == 'text.logit_scale':
        return 'logit_scale'
    if not key.startswith('visual.'):
        return key
    if is_rotary_table(key):
        return None
    key = 'visual.trunk.' + key[len('visual.'):]
    for released, ours in _RENAMES + _SWIGLU_RENAMES:
        key = key.replace(released, ours)
    if separate_qkv:
        for released, ours in _SEPARATE_QKV_BIAS:
            if key.endswith(released):
                key = key[:-len(released)] + ours
    return key


def to_released_key(key: str, swiglu: bool) -> str:
    """The released-layout name of an open_clip key (for messages about keys a file lacks).

    `swiglu` tells whether the image tower's MLP is a SwiGLU (`w1`/`w2`/`w3` in released files).
    """
    if not key.startswith('visual.trunk.'):
        return key
    key = 'visual.' + key[len('visual.trunk.'):]
    for released, ours in _RENAMES + (_SWIGLU_RENAMES if swiglu else ()):
        key = key.replace(ours, released)
    for released, ours in _SEPARATE_QKV_BIAS:
        if key.endswith(ours):
            key = key[:-len(ours)] + released
    return key


def convert_with_origin(state_dict: Mapping[str, V]) -> tuple[dict[str, V], dict[str, str]]:
    """Convert like `convert_state_dict`, also returning each new key's name in the given dict."""
    if not is_released_layout(state_dict):
        sd = dict(state_dict)
        return sd, {k: k for k in sd}
    separate_qkv = any(k.endswith('.attn.q_proj.weight') for k in state_dict)
    out: dict[str, V] = {}
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = to_open_clip_key(key, separate_qkv)
        if new is None:
            continue
        if new in out:
            raise ValueError(f"checkpoint has both '{origin[new]}' and '{key}'")
        out[new] = value
        origin[new] = key
    return out, origin


def convert_state_dict(state_dict: Mapping[str, V]) -> dict[str, V]:
    """Map a released EVA-CLIP state dict onto the open_clip model's keys.

    Pure: the input is not modified and tensors are not copied. A dict already in open_clip's
    layout is returned unchanged (as a new dict), so the function is idempotent.
    """
    return convert_with_origin(state_dict)[0]
