"""The open_clip internals that eva_open_clip relies on are still where it expects them.

If one of these fails after an open_clip upgrade, `eva_open_clip/open_clip_seam.py` needs updating.
"""
from __future__ import annotations

import inspect

import open_clip
import open_clip.factory as oc_factory
import open_clip.pretrained as oc_pretrained

from eva_open_clip import versions


def test_model_config_registry_is_the_dict_open_clip_reads():
    assert isinstance(oc_factory._MODEL_CONFIGS, dict)
    assert 'EVA_CLIP_g_14' in oc_factory._MODEL_CONFIGS
    assert oc_factory.get_model_config('EVA_CLIP_g_14') == oc_factory._MODEL_CONFIGS['EVA_CLIP_g_14']


def test_our_configs_survive_open_clip_rescans():
    oc_factory._rescan_model_configs()
    assert 'EVA_CLIP_g_14' in open_clip.list_models()


def test_pretrained_registry_is_the_dict_open_clip_reads():
    assert isinstance(oc_pretrained._PRETRAINED, dict)
    assert oc_pretrained.get_pretrained_cfg('EVA_CLIP_g_14', 'laion400m_s11b_b41k')


def test_create_model_loads_through_the_factory_load_checkpoint():
    # create_model must call the module-level name we wrap, with these arguments
    assert 'load_checkpoint' in oc_factory.create_model.__wrapped__.__code__.co_names
    params = list(inspect.signature(oc_factory.load_checkpoint.__wrapped__).parameters)
    assert params[:3] == ['model', 'checkpoint_path', 'strict']  # weights_only, device: open_clip >= 2.29


def test_factories_build_through_the_module_level_create_model():
    for fn in (oc_factory.create_model_and_transforms, oc_factory.create_model_from_pretrained):
        assert 'create_model' in fn.__code__.co_names
    params = inspect.signature(oc_factory.create_model.__wrapped__).parameters
    assert list(params)[:2] == ['model_name', 'pretrained']
    assert {'precision', 'device', 'force_image_size'} <= set(params)
    assert ('load_weights' in params) == (versions.open_clip_at_least((3, 0)))  # as versions.py says


def test_wrappers_are_installed_once_and_exported():
    import eva_open_clip.open_clip_seam as seam
    seam.install()
    assert open_clip.create_model is oc_factory.create_model
    assert open_clip.load_checkpoint is oc_factory.load_checkpoint
    assert not hasattr(oc_factory.create_model.__wrapped__, '__wrapped__')
    assert not hasattr(oc_factory.load_checkpoint.__wrapped__, '__wrapped__')
