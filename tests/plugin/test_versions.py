"""Features an older open_clip or timm lacks fail with one clear error naming the release that has them.

Each test here runs where the installed release lacks the feature (the oldest supported set in
`.ci/run`); where it has it, the feature's own tests run instead and these are skipped.
"""
from __future__ import annotations

import importlib.util
import json

import open_clip
import pytest
import timm
from packaging.version import Version

import eva_open_clip
from eva_open_clip import versions
from eva_open_clip.versions import UnsupportedVersion
from support.checkpoints import golden, register_reference


def _lacks_open_clip(version):
    return pytest.mark.skipif(versions.open_clip_at_least(version),
                              reason=f'open_clip {versions.OPEN_CLIP_VERSION} has it')


def test_versions_are_read_from_the_installed_packages():
    assert versions.OPEN_CLIP == Version(getattr(open_clip, '__version__', versions.OPEN_CLIP_VERSION))
    assert versions.TIMM == Version(timm.__version__)
    # packaging's rules: a local build counts as its release, a pre-release or development build does not
    assert versions.at_least(Version('2.24.0'), (2, 24)) and versions.at_least(Version('3.3.0+cpu'), (3, 3))
    assert not versions.at_least(Version('3.0.0rc1'), (3, 0))
    assert not versions.at_least(Version('1.0.20.dev0'), (1, 0, 20))


def test_the_trainer_module_is_where_versions_says():
    assert importlib.util.find_spec(versions.TRAINER_MODULE.rsplit('.', 1)[0]) is not None


@pytest.mark.skipif(versions.open_clip_at_least((3, 0)) and versions.timm_at_least((1, 0, 18)),
                    reason='this set has it')
def test_force_image_size_names_the_release_it_needs(tiny_checkpoint):
    with pytest.raises(UnsupportedVersion, match=r'force_image_size with EVA models needs (open_clip_torch >= 3\.0|'
                                                 r'timm >= 1\.0\.18) \(installed: '):
        open_clip.create_model(register_reference('tiny_a'), pretrained=str(tiny_checkpoint), force_image_size=70)


@_lacks_open_clip((3, 0))
def test_load_weights_names_the_release_it_needs(tiny_checkpoint):
    with pytest.raises(UnsupportedVersion, match=r'load_weights=.*needs open_clip_torch >= 3\.0'):
        open_clip.create_model(register_reference('tiny_a'), pretrained=str(tiny_checkpoint), load_weights=False)


@_lacks_open_clip((2, 32))
def test_forward_intermediates_names_the_release_it_needs(tiny_checkpoint):
    model = open_clip.create_model(register_reference('tiny_a'), pretrained=str(tiny_checkpoint))
    g = golden('tiny_a')
    with pytest.raises(UnsupportedVersion, match=r'forward_intermediates needs open_clip_torch >= 2\.32'):
        model.forward_intermediates(image=g['pixels'], text=g['tokens'])


@pytest.mark.skipif(versions.timm_at_least((1, 0, 20)), reason=f'timm {versions.TIMM_VERSION} has it')
def test_swiglu_without_sub_ln_names_the_timm_it_needs():
    config = json.loads(json.dumps(golden('tiny_a')['config']))
    config['vision_cfg']['naiveswiglu'] = True
    eva_open_clip.register_eva_model('test-naive-swiglu', config)
    with pytest.raises(UnsupportedVersion, match=r"swiglu_align_to=1\) needs timm >= 1\.0\.20"):
        open_clip.create_model('test-naive-swiglu')


@_lacks_open_clip((3, 1))
def test_lock_text_tower_names_the_release_it_needs(tiny_checkpoint):
    model = open_clip.create_model(register_reference('tiny_a'), pretrained=str(tiny_checkpoint))
    with pytest.raises(UnsupportedVersion, match=r'lock_text_tower needs open_clip_torch >= 3\.1'):
        model.lock_text_tower()
