"""EVA-CLIP model configs: parse the original format and translate it to open_clip + timm terms.

Two dialects of the same format exist: the EVA-01 release (`EVA_CLIP_g_14.json`: `embed_dim`,
`vision_cfg`, `text_cfg`) and the later EVA-CLIP repository, which adds `eva_model_name`, rotary
embedding (`rope`, `pt_hw_seq_len`, `intp_freq`), `naiveswiglu`, `subln`, `postnorm`, ... to
`vision_cfg`. Both are accepted. Every key either maps to an equivalent timm `Eva` / open_clip
setting, is a speed-only switch (`xattn`, `fusedLN`), or is rejected by name.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

from .errors import UserError

ConfigLike = Union[Mapping[str, Any], str, Path]

# Keys that only select kernels in the EVA-CLIP code (xformers attention, apex LayerNorm).
_SPEED_ONLY = {'xattn', 'fusedLN'}
_TOP_KEYS = {'embed_dim', 'vision_cfg', 'text_cfg', 'quick_gelu', 'custom_text'}
_VISION_KEYS = {
    'image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size', 'drop_path_rate',
    'eva_model_name', 'ls_init_value', 'patch_dropout', 'qkv_bias', 'rope', 'pt_hw_seq_len',
    'intp_freq', 'naiveswiglu', 'subln', 'postnorm', 'global_average_pool', 'use_rms_norm',
} | _SPEED_ONLY
_TEXT_KEYS = {
    'context_length', 'vocab_size', 'width', 'heads', 'layers', 'mlp_ratio', 'ls_init_value',
    'attn_mask',
} | _SPEED_ONLY
_REQUIRED_VISION = ('image_size', 'layers', 'width', 'head_width', 'mlp_ratio', 'patch_size')
_REQUIRED_TEXT = ('context_length', 'vocab_size', 'width', 'heads', 'layers')


class ConfigError(UserError, ValueError):
    """An EVA-CLIP config that cannot be read or represented exactly (found before any work: exit status 2)."""

    exit_code = 2


@dataclass(frozen=True)
class EvaSpec:
    """A parsed EVA-CLIP config: the timm `Eva` arguments and the open_clip model config."""

    original: dict[str, Any]
    timm_kwargs: dict[str, Any]
    open_clip_cfg: dict[str, Any]

    @property
    def mlp_hidden(self) -> int:
        return int(self.timm_kwargs['embed_dim'] * self.timm_kwargs['mlp_ratio'])

    def stock_timm_name(self) -> str | None:
        """The stock timm model with exactly this image tower, as open_clip builds it (see `tower.stock_timm_name`)."""
        from .tower import stock_timm_name
        return stock_timm_name(self.timm_kwargs, self.open_clip_cfg['embed_dim'],
                               self.open_clip_cfg['vision_cfg']['timm_pool'])


def read_config(config: ConfigLike) -> dict[str, Any]:
    """Return the config as a dict, reading it from a JSON file when given a path."""
    if isinstance(config, (str, Path)):
        try:
            with open(config, encoding='utf-8') as f:
                return json.load(f)
        except OSError as e:
            raise ConfigError(f'{config}: {e.strerror or e}') from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f'{config}: not a JSON file ({e})') from None
    return json.loads(json.dumps(dict(config)))  # deep, JSON-normalized copy


def _check_keys(section: str, cfg: Mapping[str, Any], allowed: set[str], required: tuple[str, ...]) -> None:
    for key in cfg:
        if key not in allowed:
            raise ConfigError(f"unsupported EVA-CLIP config key '{section}{key}' (it would change the model)")
    for key in required:
        if key not in cfg:
            raise ConfigError(f"EVA-CLIP config is missing '{section}{key}'")


def _side(v: Mapping[str, Any], key: str) -> int:
    """A square size given as an int or as [h, w] with h == w."""
    value = v[key]
    if isinstance(value, (list, tuple)):
        if len(value) != 2 or value[0] != value[1]:
            raise ConfigError(f"unsupported EVA-CLIP config: non-square 'vision_cfg.{key}' {list(value)}")
        value = value[0]
    return int(value)


def _vision_timm_kwargs(v: Mapping[str, Any]) -> dict[str, Any]:
    width, head_width = int(v['width']), int(v['head_width'])
    if width % head_width:
        raise ConfigError(f"vision_cfg.width ({width}) is not a multiple of vision_cfg.head_width ({head_width})")
    if v.get('global_average_pool', False):
        raise ConfigError("unsupported EVA-CLIP config key 'vision_cfg.global_average_pool' = true")
    if v.get('postnorm') and v.get('ls_init_value'):
        raise ConfigError("unsupported EVA-CLIP config: 'vision_cfg.ls_init_value' with 'vision_cfg.postnorm' "
                          "(timm's post-norm block has no layer scale)")
    image_size, patch_size = _side(v, 'image_size'), _side(v, 'patch_size')
    subln, swiglu = bool(v.get('subln', False)), bool(v.get('naiveswiglu', False))
    ls_init = v.get('ls_init_value')
    # The EVA-CLIP-8B/18B code (the dialect with `use_rms_norm`) gives the vision head a bias only
    # when the attention has q/v biases; the earlier EVA-CLIP code always gives it one.
    head_bias = bool(v.get('qkv_bias', True)) if 'use_rms_norm' in v else True
    kwargs: dict[str, Any] = dict(
        img_size=image_size,
        patch_size=patch_size,
        embed_dim=width,
        depth=int(v['layers']),
        num_heads=width // head_width,
        mlp_ratio=float(v['mlp_ratio']),
        qkv_bias=bool(v.get('qkv_bias', True)),
        # sub-LN models project q, k and v separately (q_proj/k_proj/v_proj) and normalize inside
        # the attention (inner_attn_ln) and the MLP (ffn_ln)
        qkv_fused=not subln,
        swiglu_mlp=swiglu,
        # a SwiGLU without its LayerNorm keeps separate gate/value projections (w1, w2) in timm
        # only when an alignment is set; 1 leaves the width unchanged
        swiglu_align_to=1 if swiglu and not subln else 0,
        scale_mlp=subln,
        scale_attn_inner=subln,
        use_rot_pos_emb=bool(v.get('rope', False)),
        ref_feat_shape=None,
        use_post_norm=bool(v.get('postnorm', False)),
        init_values=float(ls_init) if ls_init else None,
        # two settings that `tower.build_eva` turns into timm terms: the norm layer (RMSNorm: weight
        # only, eps 1e-6, as the EVA-CLIP-18B code) and whether the head (image projection) has a bias
        norm='rmsnorm' if v.get('use_rms_norm') else 'layernorm',
        head_bias=head_bias,
    )
    if kwargs['use_rot_pos_emb']:
        pt = int(v.get('pt_hw_seq_len', 16))
        grid = image_size // patch_size
        if not v.get('intp_freq', False) and grid != pt:
            raise ConfigError(
                f"unsupported EVA-CLIP config: rope without intp_freq needs image_size/patch_size == "
                f"pt_hw_seq_len ({grid} != {pt})")
        kwargs['ref_feat_shape'] = (pt, pt)
    return kwargs


def parse_config(config: ConfigLike) -> dict[str, Any]:
    """Validate an EVA-CLIP config (dict or JSON path) and return it as a plain dict."""
    cfg = read_config(config)
    if not isinstance(cfg, dict):
        raise ConfigError('an EVA-CLIP config is a JSON object with embed_dim, vision_cfg and text_cfg')
    _check_keys('', cfg, _TOP_KEYS, ('embed_dim', 'vision_cfg', 'text_cfg'))
    _check_keys('vision_cfg.', cfg['vision_cfg'], _VISION_KEYS, _REQUIRED_VISION)
    _check_keys('text_cfg.', cfg['text_cfg'], _TEXT_KEYS, _REQUIRED_TEXT)
    return cfg


def build_spec(config: ConfigLike, timm_name: str) -> EvaSpec:
    """Translate an EVA-CLIP config into the timm image tower arguments and an open_clip model config.

    `timm_name` is the timm model name the open_clip config refers to for the image tower.
    """
    cfg = parse_config(config)
    v, t = cfg['vision_cfg'], cfg['text_cfg']
    timm_kwargs = _vision_timm_kwargs(v)
    text_cfg: dict[str, Any] = {k: t[k] for k in _REQUIRED_TEXT}
    if t.get('mlp_ratio') is not None:
        text_cfg['mlp_ratio'] = float(t['mlp_ratio'])
    if t.get('ls_init_value') is not None:
        text_cfg['ls_init_value'] = float(t['ls_init_value'])
    if not t.get('attn_mask', True):
        text_cfg['no_causal_mask'] = True
    vision_cfg: dict[str, Any] = dict(
        image_size=timm_kwargs['img_size'],
        timm_model_name=timm_name,
        timm_model_pretrained=False,
        timm_pool='token',  # final norm, then the class token
        timm_proj=None,  # the trunk's own head is the image projection (`visual.head`)
    )
    if v.get('drop_path_rate'):
        vision_cfg['timm_drop_path'] = float(v['drop_path_rate'])
    if v.get('patch_dropout'):
        vision_cfg['patch_dropout'] = float(v['patch_dropout'])
    open_clip_cfg: dict[str, Any] = dict(
        embed_dim=int(cfg['embed_dim']), vision_cfg=vision_cfg, text_cfg=text_cfg, custom_text=True)
    if cfg.get('quick_gelu'):
        open_clip_cfg['quick_gelu'] = True
    return EvaSpec(original=cfg, timm_kwargs=timm_kwargs, open_clip_cfg=open_clip_cfg)
