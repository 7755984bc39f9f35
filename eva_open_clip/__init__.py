"""EVA-CLIP as first-class open_clip models.

Importing this package registers the released EVA-CLIP models with open_clip (no network access):

    import eva_open_clip, open_clip
    model, _, preprocess = open_clip.create_model_and_transforms('EVA_CLIP_g_14', pretrained='eva_clip_psz14.pt')
"""
from . import open_clip_seam
from .checkpoint import CheckpointError, load_image_tower
from .configs import ConfigError
from .errors import UserError
from .layout import convert_state_dict
from .registry import list_eva_models, register_builtin_models, register_eva_model, unregister_eva_model

__all__ = ['CheckpointError', 'ConfigError', 'convert_state_dict', 'list_eva_models', 'load_image_tower',
           'register_eva_model', 'unregister_eva_model', 'UserError']
__version__ = '0.1.0'

open_clip_seam.install()
register_builtin_models()
