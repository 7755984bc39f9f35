"""The EVA model registry: EVA-CLIP configs made into open_clip models, with their pretrained tags."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

import open_clip

from . import checkpoint, open_clip_seam
from .configs import ConfigError, ConfigLike, EvaSpec, build_spec, parse_config, read_config
from .errors import UsageError, did_you_mean, param, say
from .tower import register_tower, unregister_tower


@dataclass(frozen=True)
class EvaModel:
    """One registered EVA model: its open_clip name, parsed config and pretrained tags."""

    name: str
    spec: EvaSpec
    timm_name: str
    pretrained: dict[str, str] = field(default_factory=dict)  # tag -> 'org/repo/file' on the HF hub


class Release(NamedTuple):
    """A released EVA-CLIP model: its open_clip name and tag, its file on the Hugging Face hub, its size, and the
    memory its weights take in bf16 and with int8 linear layers (`quantize.weight_bytes`, in GB)."""

    name: str
    tag: str
    hub_file: str  # 'org/repo/file'
    params: str  # parameters, as counted in the built model
    file_size: str  # the released file's size and (where not fp16) dtype
    bf16_gb: float
    int8_gb: float


BUILTIN_MODELS: tuple[Release, ...] = (
    Release('EVA_CLIP_g_14', 'laion400m_s11b_b41k', 'BAAI/EVA/eva_clip_psz14.pt',
            '1.14B', '2.3 GB', 2.27, 1.21),
    Release('EVA01-CLIP-g-14', 'laion400m_s11b_b41k', 'QuanSun/EVA-CLIP/EVA01_CLIP_g_14_psz14_s11B.pt',
            '1.14B', '2.3 GB', 2.27, 1.21),
    Release('EVA01-CLIP-g-14-plus', 'merged2b_s11b_b114k', 'QuanSun/EVA-CLIP/EVA01_CLIP_g_14_plus_psz14_s11B.pt',
            '1.37B', '2.7 GB', 2.73, 1.52),
    Release('EVA02-CLIP-B-16', 'merged2b_s8b_b131k', 'QuanSun/EVA-CLIP/EVA02_CLIP_B_psz16_s8B.pt',
            '150M', '0.3 GB', 0.3, 0.19),
    Release('EVA02-CLIP-L-14', 'merged2b_s4b_b131k', 'QuanSun/EVA-CLIP/EVA02_CLIP_L_psz14_s4B.pt',
            '428M', '0.9 GB', 0.86, 0.5),
    Release('EVA02-CLIP-L-14-336', 'merged2b_s6b_b61k', 'QuanSun/EVA-CLIP/EVA02_CLIP_L_336_psz14_s6B.pt',
            '428M', '0.9 GB', 0.86, 0.5),
    Release('EVA02-CLIP-bigE-14', 'laion2b_s4b_b115k', 'QuanSun/EVA-CLIP/EVA02_CLIP_E_psz14_s4B.pt',
            '4.7B', '9.4 GB', 9.41, 4.87),
    Release('EVA02-CLIP-bigE-14-plus', 'laion2b_s9b_b144k', 'QuanSun/EVA-CLIP/EVA02_CLIP_E_psz14_plus_s9B.pt',
            '5.0B', '10.1 GB bf16', 10.09, 5.33),
    Release('EVA-CLIP-8B', 'merged2b_s9b', 'BAAI/EVA-CLIP-8B/EVA_CLIP_8B_psz14_s9B.pt',
            '8.2B', '32.9 GB fp32', 16.44, 8.51),
    Release('EVA-CLIP-8B-448', 'merged2b_s0.6b', 'BAAI/EVA-CLIP-8B-448/EVA_CLIP_8B_psz14_plus_s0.6B.pt',
            '8.2B', '32.9 GB fp32', 16.45, 8.51),  # the EVA-CLIP-18B code's 'EVA-CLIP-8B-plus'
    Release('EVA-CLIP-18B', 'merged2b_s6b', 'BAAI/EVA-CLIP-18B/EVA_CLIP_18B_psz14_s6B.fp16.pt',
            '18.3B', '36.7 GB', 36.65, 18.62),
)

_MODELS: dict[str, EvaModel] = {}


def model_configs_dir() -> Path:
    """The folder of shipped EVA-CLIP configs: inside the wheel, or at the top of a source checkout."""
    packaged = Path(__file__).parent / 'model_configs'
    return packaged if packaged.is_dir() else Path(__file__).parent.parent / 'model_configs'


def _timm_name(name: str) -> str:
    return 'evaclip_' + re.sub(r'[^0-9a-zA-Z]+', '_', name).strip('_').lower()


def register_eva_model(name: str, config: ConfigLike, pretrained: Mapping[str, str] | None = None) -> None:
    """Make `name` an open_clip model built from an EVA-CLIP config (dict or JSON path).

    Afterwards `open_clip.create_model_and_transforms(name, pretrained=PATH)` builds the model and
    loads a checkpoint in the released layout, and `open_clip.get_tokenizer(name)` works.
    `pretrained` maps open_clip-style tags to hub files ('org/repo/file.pt'). Registering the same
    name with the same config again does nothing; with a different config it is an error.
    """
    source = f'{config}: ' if isinstance(config, (str, os.PathLike)) else ''
    config = read_config(config)  # a file that cannot be read names itself
    try:
        original = parse_config(config)
        spec = build_spec(original, _timm_name(name))
    except ConfigError as e:
        raise ConfigError(f'{source}{e}') from None
    except (ValueError, TypeError, KeyError, AttributeError) as e:  # a value of the wrong type or form
        raise ConfigError(f'{source}not a usable EVA-CLIP config ({type(e).__name__}: {e})') from None
    tags = dict(pretrained or {})
    existing = _MODELS.get(name)
    if existing is not None:
        if existing.spec.original != original or any(existing.pretrained.get(t, f) != f for t, f in tags.items()):
            raise ConfigError(f"EVA model '{name}' is already registered with a different config: "
                              f"register this one under another name")
        if tags.keys() - existing.pretrained.keys():
            _register_tags(existing, tags)
        return
    if open_clip_seam.has_model_config(name):
        raise ConfigError(f"open_clip already has a model named '{name}': register it under another name")
    timm_name = _timm_name(name)
    if any(m.timm_name == timm_name for m in _MODELS.values()):
        raise ConfigError(f"EVA model name '{name}' collides with another registered name: choose another")
    register_tower(timm_name, spec.timm_kwargs)
    model = EvaModel(name=name, spec=spec, timm_name=timm_name)
    open_clip_seam.add_model_config(name, spec.open_clip_cfg)
    _MODELS[name] = model
    _register_tags(model, tags)


def unregister_eva_model(name: str) -> None:
    """Remove the EVA model `name` registered by `register_eva_model` from open_clip (it may then be registered
    again, with another config); the released models cannot be removed."""
    if any(release.name == name for release in BUILTIN_MODELS):
        raise ConfigError(f"'{name}' is a released EVA-CLIP model: it stays registered")
    model = _MODELS.pop(name, None)
    if model is None:
        raise ConfigError(f"no EVA model named '{name}' is registered")
    open_clip_seam.remove_model(name)
    unregister_tower(model.timm_name)


def _register_tags(model: EvaModel, tags: Mapping[str, str]) -> None:
    for tag, hub_file in tags.items():
        model.pretrained[tag] = hub_file
        open_clip_seam.add_pretrained_tag(model.name, tag, hub_file)


def register_builtin_models() -> None:
    """Register the released EVA-CLIP models from the shipped configs (idempotent, no network)."""
    configs = model_configs_dir()
    for release in BUILTIN_MODELS:
        register_eva_model(release.name, configs / f'{release.name}.json', pretrained={release.tag: release.hub_file})


def get_eva_model(name: str) -> EvaModel | None:
    """The registered EVA model called `name`, if any."""
    return _MODELS.get(name)


def require_eva_model(name: str) -> EvaModel:
    """The registered EVA model called `name`; a UsageError for any other name (open_clip's own models too)."""
    model = _MODELS.get(name)
    if model is None:
        where = say(python='eva_open_clip.list_eva_models() lists them',
                    command_line='`eva-open-clip models` lists them')
        raise UsageError(f'{name}: not an EVA-CLIP model ({where})')
    return model


def list_eva_models() -> list[str]:
    """Names of all registered EVA models."""
    return list(_MODELS)


def check_model(name: str) -> None:
    """An unknown model name is refused, naming the closest registered names and where to find them."""
    if name in open_clip.list_models():
        return
    where = say(python='eva_open_clip.list_eva_models() lists the EVA-CLIP models; a custom config: '
                       f"eva_open_clip.register_eva_model('{name}', 'CONFIG.json')",
                command_line=f'`eva-open-clip models` lists the EVA-CLIP models; a custom config: '
                             f'--register {name}=CONFIG.json')
    raise UsageError(f"{param('model', name)}: no such model{did_you_mean(name, open_clip.list_models())} ({where})")


def default_pretrained(model_name: str) -> str | None:
    """The model's first pretrained tag (the released weights on the hub), if it has one."""
    tags = open_clip.list_pretrained_tags_by_model(model_name)
    return tags[0] if tags else None


def resolve_pretrained(model_name: str, pretrained: str | None) -> str:
    """The tag or file `pretrained` names (the model's hub tag when not given), checked to exist."""
    pretrained = pretrained or default_pretrained(model_name)
    if not pretrained:
        raise UsageError(f"{param('model', model_name)} has no pretrained tag: pass "
                         f"{param('pretrained', '/path/to/checkpoint')}")
    try:
        open_clip_seam.check_pretrained(model_name, pretrained)
    except checkpoint.CheckpointError as e:
        raise UsageError(f"{param('pretrained', e.path)}: {e.problem}") from None
    return pretrained
