"""Reading EVA-CLIP checkpoint files and loading them strictly into open_clip models.

Every failure is a `CheckpointError` whose message names the file and, where keys are at fault, the
keys as they are spelled in the user's file. Nothing is copied into the model until the whole
checkpoint has been checked against it, so a failed load leaves the model untouched.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import torch
from torch import nn

from . import empty_build, mapped_checkpoint
from .errors import UserError
from .layout import convert_with_origin, is_released_layout, is_rotary_table, to_released_key, unwrap_state_dict

_MAX_LISTED = 5
StateDict = dict[str, torch.Tensor]


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be loaded into the requested model."""

    def __init__(self, path: str | os.PathLike, problem: str):
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def _key_list(keys: list[str]) -> str:
    shown = ', '.join(f"'{k}'" for k in keys[:_MAX_LISTED])
    more = len(keys) - _MAX_LISTED
    return shown + (f' and {more} more' if more > 0 else '')


def _read_safetensors(path: Path) -> StateDict:
    try:
        return mapped_checkpoint.read_safetensors(path)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(path, f'not a readable safetensors file ({str(e)[:200]})') from None


_REFUSED = ('refused: the file holds Python objects other than tensors, which could run code when unpickled; it '
            'was not executed (only plain state dicts are loaded)')


def _read_torch(path: Path, weights_only: bool) -> object:
    try:
        if zipfile.is_zipfile(path):  # torch.save's format: read through a read-only mapping
            return mapped_checkpoint.read_torch_zip(path, weights_only=weights_only)
        return torch.load(path, map_location='cpu', weights_only=weights_only)  # legacy pickles
    except mapped_checkpoint.CorruptRecord as e:
        raise CheckpointError(path, str(e)) from None
    except mapped_checkpoint.UnsafePickle:
        raise CheckpointError(path, _REFUSED) from None
    except pickle.UnpicklingError:
        with open(path, 'rb') as f:
            if weights_only and mapped_checkpoint.whole_pickles(f, mapped_checkpoint.LEGACY_PICKLES):
                raise CheckpointError(path, _REFUSED) from None
        raise CheckpointError(path, 'not a PyTorch checkpoint (unreadable pickle data)') from None
    except Exception as e:  # torch raises many types for damaged files (EOFError, IndexError, ...)
        detail = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}' if str(e) else type(e).__name__
        raise CheckpointError(path, f'truncated or not a PyTorch checkpoint ({detail})') from None


def read_state_dict(path: str | os.PathLike, weights_only: bool = True) -> StateDict:
    """Read a `.pt`/`.pth`/`.bin` or `.safetensors` checkpoint and return its (unwrapped) state dict.

    Pickles are read with `weights_only=True` unless the caller opts out. Zip checkpoints and
    safetensors files are mapped read-only (see `mapped_checkpoint`): tensors are paged in from the
    file as they are used, whatever the file's size.
    """
    p = Path(path)
    check_file(p)
    if p.suffix == '.safetensors':
        obj: object = _read_safetensors(p)
    else:
        obj = _read_torch(p, weights_only)
    if not isinstance(obj, Mapping):
        raise CheckpointError(p, f'holds a {type(obj).__name__}, not a state dict')
    sd = unwrap_state_dict(obj)
    if not sd:
        raise CheckpointError(p, 'holds no tensors')
    bad = [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(p, f'entries that are not tensors: {_key_list(bad)}')
    return sd


def _model_swiglu(expected: Mapping[str, torch.Tensor]) -> bool:
    return any('.mlp.fc1_g.' in k for k in expected)


def check_file(path: str | os.PathLike) -> None:
    """Raise `CheckpointError` unless `path` names an existing, non-empty file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, 'no such file')
    if p.is_dir():
        raise CheckpointError(p, 'is a directory, not a checkpoint file')
    if p.stat().st_size == 0:
        raise CheckpointError(p, 'is empty (0 bytes)')


_ROPE_TOLERANCE = 1e-2  # stored tables are rounded to fp16/bf16; a different grid differs by O(1)


def _check_rotary_tables(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                         shown: Callable[[str], str]) -> None:
    """Released EVA02 files carry the fixed rotary tables; check they are the ones the model computes."""
    stored = {k: v for k, v in state_dict.items() if is_rotary_table(k)}
    rope = getattr(getattr(getattr(model, 'visual', None), 'trunk', None), 'rope', None)
    if not stored or rope is None:
        return  # absent tables are recomputed; tables without a rotary model are reported as unexpected
    sin, cos = rope.get_embed().float().cpu().chunk(2, dim=-1)
    for key, table in stored.items():
        computed = sin if key.endswith('freqs_sin') else cos
        if table.shape != computed.shape:
            raise CheckpointError(path, f"rotary table '{shown(key)}' has shape {list(table.shape)}, "
                                        f"the model's is {list(computed.shape)} (image size or rope grid differs)")
        if (table.float() - computed).abs().max() > _ROPE_TOLERANCE:
            raise CheckpointError(path, f"rotary table '{shown(key)}' differs from the model's (rope grid "
                                        f"pt_hw_seq_len or intp_freq differs from the config)")


class Checked(NamedTuple):
    """A state dict in the model's key names, and what a non-strict load skips, in the model's key names."""

    state_dict: StateDict
    missing_keys: list[str]
    unexpected_keys: list[str]


def check_and_convert(path: str | os.PathLike, state_dict: Mapping[str, torch.Tensor], model: nn.Module,
                      strict: bool = True, added_prefix: str = '') -> Checked:
    """Convert a state dict to the model's keys and check it fits, naming keys as in the file.

    Raises `CheckpointError` for missing or unexpected keys (when `strict`) and for shape mismatches.
    `added_prefix` is a prefix the caller put on every key; messages show keys without it.
    """
    def shown(key: str) -> str:
        return key[len(added_prefix):] if added_prefix and key.startswith(added_prefix) else key

    released = is_released_layout(state_dict)
    try:
        converted, origin = convert_with_origin(state_dict)
    except ValueError as e:  # two of the file's keys name the same model key
        raise CheckpointError(path, str(e)) from None
    if released:
        _check_rotary_tables(path, state_dict, model, shown)
    expected = model.state_dict()
    swiglu = _model_swiglu(expected)
    if 'logit_scale' in converted and 'logit_scale' in expected:
        scale = converted['logit_scale']
        if scale.numel() == expected['logit_scale'].numel():
            converted['logit_scale'] = scale.reshape(expected['logit_scale'].shape)
    unexpected_keys = [k for k in converted if k not in expected]
    unexpected = [shown(origin[k]) for k in unexpected_keys]
    # a key present under the same name but meaning another layout (e.g. q_bias) is unexpected only
    missing_keys = [k for k in expected if k not in converted
                    and shown(to_released_key(k, swiglu) if released else k) not in set(unexpected)]
    missing = [shown(to_released_key(k, swiglu) if released else k) for k in missing_keys]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f'{len(missing)} missing key(s): {_key_list(missing)}')
        if unexpected:
            parts.append(f'{len(unexpected)} unexpected key(s): {_key_list(unexpected)}')
        hint = '' if released or any(k.startswith('visual.trunk.') for k in converted) else \
            ' (this does not look like an EVA-CLIP checkpoint)'
        raise CheckpointError(path, 'does not match the model: ' + '; '.join(parts) + hint)
    mismatched = [
        f"'{shown(origin[k])}' has shape {list(v.shape)}, the model expects {list(expected[k].shape)}"
        for k, v in converted.items() if k in expected and v.shape != expected[k].shape
    ]
    if mismatched:
        more = f' (and {len(mismatched) - _MAX_LISTED} more)' if len(mismatched) > _MAX_LISTED else ''
        raise CheckpointError(path, 'shape mismatch: ' + '; '.join(mismatched[:_MAX_LISTED]) + more)
    return Checked({k: v for k, v in converted.items() if k in expected}, missing_keys, unexpected_keys)


def copy_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], release: bool) -> None:
    """Copy checked tensors into the module's parameters and buffers, one tensor at a time.

    Parameters left empty by `empty_build` are created on their final device and dtype from the
    file's tensor. With `release`, the file pages behind each mapped source tensor are dropped from
    this process right after it is copied, so the checkpoint and the model are never resident in
    full at the same time.
    """
    with torch.no_grad():
        for key, value in state_dict.items():
            empty_build.fill_tensor(module, key, value)
            if release:
                mapped_checkpoint.release(value)
    empty_build.check_filled(module)


def _is_mapped(path: str | os.PathLike) -> bool:
    return Path(path).suffix == '.safetensors' or zipfile.is_zipfile(path)


def load_into(model: nn.Module, path: str | os.PathLike, strict: bool = True, weights_only: bool = True) -> Checked:
    """Read `path`, convert it from the released layout if needed and load it into `model`.

    Returns what was loaded, with the keys a non-strict load skipped (the model's keys the file lacks,
    and the file's keys, converted, that the model lacks), as `nn.Module.load_state_dict` reports them.
    """
    empty_build.restore_buffers()
    state_dict = read_state_dict(path, weights_only=weights_only)
    checked = check_and_convert(path, state_dict, model, strict=strict)
    copy_into(model, checked.state_dict, release=_is_mapped(path))
    return checked


def load_tower(model: nn.Module, tower: str, path: str | os.PathLike, weights_only: bool = True,
               part_of_release: bool = False) -> None:
    """Load a file holding one tower (`visual` or `text`; keys with the `tower.` prefix or without) into
    `model.<tower>`, as strictly as a whole checkpoint; with `part_of_release`, that tower's part of a whole
    release (the rest of the file left aside)."""
    state_dict = read_state_dict(path, weights_only=weights_only)
    if part_of_release:
        state_dict = {k: v for k, v in state_dict.items() if k.startswith(f'{tower}.') and k != 'text.logit_scale'}
        if not state_dict:
            raise CheckpointError(path, f'holds no {tower}. key: not a release with that tower')
    prefix = '' if any(k.startswith(f'{tower}.') for k in state_dict) else f'{tower}.'
    state_dict = {prefix + k: v for k, v in state_dict.items()}
    holder = nn.Module()
    setattr(holder, tower, getattr(model, tower))  # a view of the model holding only that tower
    copy_into(holder, check_and_convert(path, state_dict, holder, added_prefix=prefix).state_dict,
              release=_is_mapped(path))


def load_image_tower(model: nn.Module, path: str | os.PathLike, weights_only: bool = True) -> None:
    """Load a file holding only the image tower (the `visual.` part of a release) into `model.visual`.

    Keys may carry the `visual.` prefix or not; the load is as strict as for full checkpoints.
    """
    load_tower(model, 'visual', path, weights_only)
