"""`eva_open_clip.eva_clip`: the EVA-CLIP repository's `eva_clip` API, against the outputs of that code (PuLID's copy)
on a depth-24, 336-px EVA02 model, and every name and keyword its callers use."""
from __future__ import annotations

import hashlib
import shutil

import open_clip
import pytest
import torch
from PIL import Image

import eva_open_clip.eva_clip as eva_clip
from eva_open_clip import CheckpointError
from eva_open_clip.eva_clip import constants
from support.checkpoints import (
    DATA,
    DEEP_CASE,
    REFERENCE_CASES,
    fake_hub_cache,
    golden,
    register_reference,
    rel_err,
    released_state_dict,
)
from support.cli import run_cli

DEEP = 'EVA02-CLIP-deep-tiny-336'  # the name that code registered the config under (its file's name)


@pytest.fixture(scope='module')
def deep(tmp_path_factory):
    """The deep model's config (named as that code named it) and checkpoint as files, registered."""
    folder = tmp_path_factory.mktemp('deep')
    shutil.copy(DATA / DEEP_CASE / 'config.json', folder / f'{DEEP}.json')
    torch.save(released_state_dict(DEEP_CASE), folder / 'checkpoint.pt')
    eva_clip.add_model_config(folder / f'{DEEP}.json')
    return folder


def test_pulids_call_gives_that_codes_outputs(deep):
    reference = golden(DEEP_CASE)
    model, _, _ = eva_clip.create_model_and_transforms(DEEP, str(deep / 'checkpoint.pt'), force_custom_clip=True)
    visual = model.visual
    assert model.training == reference['model_training_as_returned']  # as that code returns it
    assert (visual.image_size, visual.image_mean, visual.image_std) == \
        (reference['image_size'], reference['image_mean'], reference['image_std'])
    assert isinstance(visual.image_size, int) and visual.get_num_layers() == len(visual.blocks) == 24
    _, _, val = eva_clip.create_model_and_transforms(DEEP, str(deep / 'checkpoint.pt'))
    pixels = torch.stack([val(Image.open(DATA / 'images' / name)) for name in reference['image_names']])
    assert hashlib.sha256(pixels.numpy().tobytes()).hexdigest() == reference['pixels_sha256']  # bit for bit
    tokens = eva_clip.get_tokenizer(DEEP)(reference['captions'])
    assert torch.equal(tokens, reference['tokens'])
    with torch.no_grad():
        features, hidden = visual(pixels, return_all_features=False, return_hidden=True, shuffle=False)
        every_token = visual(pixels, return_all_features=True)
        image, text = model.encode_image(pixels), model.encode_text(tokens)
    kept = reference['token_images']
    assert rel_err(features, reference['features']) < 1e-5
    assert len(hidden) == len(reference['hidden']) == 5
    for mine, theirs in zip(hidden, reference['hidden']):
        assert mine.shape == (4, 577, 64) and rel_err(mine[kept], theirs) < 1e-5
    assert rel_err(every_token[kept], reference['all_features']) < 1e-5
    assert torch.equal(features, image)  # the projected class token is encode_image's feature
    assert rel_err(image, reference['image_features']) < 1e-5 and rel_err(text, reference['text_features']) < 1e-5
    image_features, text_features, scale = model(pixels, tokens)  # CustomCLIP's forward
    assert torch.allclose(image_features, torch.nn.functional.normalize(image, dim=-1), atol=1e-6)
    assert torch.allclose(text_features, torch.nn.functional.normalize(text, dim=-1), atol=1e-6)
    assert float(scale) == pytest.approx(float(reference['logit_scale'].exp()), rel=1e-6)


def test_shuffle_adds_the_patch_positions_in_a_random_order(deep):
    model = eva_clip.create_model(DEEP, str(deep / 'checkpoint.pt')).eval()
    pixels = torch.randn(2, 3, 336, 336, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = model.visual(pixels)
        torch.manual_seed(5)
        shuffled = model.visual(pixels, shuffle=True)
        torch.manual_seed(5)
        order = torch.cat([torch.zeros(1, dtype=torch.long), torch.randperm(576) + 1])
        trunk = model.visual.trunk
        saved = trunk.pos_embed.data.clone()
        trunk.pos_embed.data = saved[:, order]
        expected = model.visual(pixels)
        trunk.pos_embed.data = saved
    assert not torch.allclose(plain, shuffled) and torch.equal(shuffled, expected)
    assert torch.equal(model.visual(pixels), plain)  # the positions are put back


@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_every_layout_through_the_api(case, tmp_path):
    torch.save(released_state_dict(case), tmp_path / 'checkpoint.pt')
    model, preprocess = eva_clip.create_model_from_pretrained(register_reference(case), str(tmp_path / 'checkpoint.pt'))
    model.eval()  # returned in training mode, as the repository returns it (tiny_a's drop path would apply)
    reference = golden(case)
    with torch.no_grad():
        assert rel_err(model.encode_image(reference['pixels']), reference['image_features']) < 1e-4
        assert rel_err(model.encode_text(reference['tokens']), reference['text_features']) < 1e-4


def test_precision_device_and_the_other_keywords(deep):
    half = eva_clip.create_model(DEEP, str(deep / 'checkpoint.pt'), precision='fp16', device='cpu')
    assert {p.dtype for p in half.parameters()} == {torch.float16}  # the repository casts the whole model
    assert {p.dtype for p in eva_clip.create_model(DEEP, precision='bf16').parameters()} == {torch.bfloat16}
    frozen, preprocess = eva_clip.create_model_from_pretrained(DEEP, str(deep / 'checkpoint.pt'), is_frozen=True)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert preprocess.transforms[0].size == 336
    alone = eva_clip.create_model_from_pretrained(DEEP, str(deep / 'checkpoint.pt'), return_transform=False)
    assert isinstance(alone, torch.nn.Module)
    quick = eva_clip.create_model(DEEP, str(deep / 'checkpoint.pt'), force_quick_gelu=True)
    tokens = eva_clip.tokenize(['a face'])
    with torch.no_grad():
        assert not torch.allclose(quick.encode_text(tokens), frozen.encode_text(tokens))  # QuickGELU in the text
    dropped = eva_clip.create_model(DEEP, force_patch_dropout=0.5)
    assert dropped.visual.trunk.patch_drop is not None
    random = eva_clip.create_model(DEEP)
    missing = eva_clip.load_checkpoint(random, str(deep / 'checkpoint.pt'))
    assert (missing.missing_keys, missing.unexpected_keys) == ([], [])
    assert all(torch.equal(a, b) for a, b in zip(random.state_dict().values(), frozen.state_dict().values()))
    train = eva_clip.image_transform(336, is_train=True)
    assert type(train.transforms[0]).__name__ == 'RandomResizedCrop' and train.transforms[0].scale == (0.9, 1.0)
    assert (constants.OPENAI_DATASET_MEAN, constants.OPENAI_DATASET_STD) == \
        (eva_clip.OPENAI_DATASET_MEAN, eva_clip.OPENAI_DATASET_STD) == \
        (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)
    visual = frozen.visual
    visual.set_grad_checkpointing(True)
    visual.lock()
    assert not any(p.requires_grad for p in visual.parameters())


def test_the_towers_from_separate_files(deep):
    both = eva_clip.create_model(DEEP, str(deep / 'checkpoint.pt'))
    towers = eva_clip.create_model(DEEP, pretrained_image=str(deep / 'checkpoint.pt'),
                                   pretrained_text=str(deep / 'checkpoint.pt'), pretrained_visual_model=DEEP)
    a, b = both.state_dict(), towers.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a if k != 'logit_scale')


def test_names_configs_and_tokens():
    names = eva_clip.list_models()
    assert 'EVA02-CLIP-L-14-336' in names and 'EVA-CLIP-8B-plus' in names and 'EVA-CLIP-8B-448' not in names
    config = eva_clip.get_model_config('EVA02-CLIP-L-14-336')
    assert config['vision_cfg']['image_size'] == 336 and config['vision_cfg']['rope'] is True
    assert eva_clip.get_model_config('EVA-CLIP-8B-plus')['vision_cfg']['image_size'] == 448
    assert eva_clip.get_model_config('nope') is None
    assert eva_clip.get_model_config('EVA02-CLIP/L-14-336') == config  # the old names with '/'
    long = eva_clip.tokenize(['word ' * 100])
    assert long.shape == (1, 77) and long[0, -1] == 49407  # cut, the end-of-text token kept last


def test_what_cannot_be_honoured_is_one_line_and_the_kinds_are_the_repositorys(deep, tmp_path):
    with pytest.raises(RuntimeError, match=r'^Model config for EVA02-CLIP-XL not found; the EVA-CLIP models are '):
        eva_clip.create_model('EVA02-CLIP-XL')
    with pytest.raises(RuntimeError, match=r'^Pretrained weights \(laion9b\) not found for model EVA02-CLIP-B-16'):
        eva_clip.create_model('EVA02-CLIP-B-16', 'laion9b')
    for keywords, message in ((dict(jit=True), 'jit=True: TorchScript is not supported'),
                              (dict(skip_list=['visual.pos_embed']), "skip_list=['visual.pos_embed']: every tensor"),
                              (dict(precision='fp64'), "precision='fp64': choose from"),
                              (dict(pretrained_hf=False), 'pretrained_hf=False')):
        with pytest.raises(RuntimeError) as error:
            eva_clip.create_model(DEEP, **keywords)
        assert str(error.value).startswith(message) and '\n' not in str(error.value)
    torch.save(released_state_dict('e02_tiny_a'), tmp_path / 'other.pt')
    with pytest.raises(RuntimeError, match=r'other\.pt: .* has shape'):  # another architecture's file
        eva_clip.create_model(DEEP, str(tmp_path / 'other.pt'))
    with pytest.raises(CheckpointError):
        eva_clip.load_checkpoint(eva_clip.create_model(DEEP), str(tmp_path / 'other.pt'))


def test_the_repositorys_tag_offline_from_the_cache(deep, tmp_path):
    """`pretrained='eva_clip'`: the model's released file, from the hub cache with no network."""
    fake_hub_cache(tmp_path / 'cache', 'example/deep/checkpoint.pt', (deep / 'checkpoint.pt').read_bytes())
    script = tmp_path / 'pulid.py'
    script.write_text(
        'import eva_open_clip\n'
        f'eva_open_clip.register_eva_model({DEEP!r}, {str(deep / f"{DEEP}.json")!r}, '
        'pretrained={"released": "example/deep/checkpoint.pt"})\n'
        'from eva_open_clip.eva_clip import create_model_and_transforms\n'
        f'model, _, _ = create_model_and_transforms({DEEP!r}, "eva_clip", force_custom_clip=True)\n'
        'print(float(model.visual.trunk.cls_token.float().sum()))\n')
    result = run_cli('run', script, env={'HF_HUB_CACHE': str(tmp_path / 'cache'), 'HF_HUB_OFFLINE': '1'})
    assert result.returncode == 0, result.stderr[-2000:]
    expected = released_state_dict(DEEP_CASE)['visual.cls_token'].float().sum()
    assert float(result.stdout.strip().splitlines()[-1]) == pytest.approx(float(expected))
