"""`quantize='int8'`: the linear layers' weights as int8 (torchao), quantized as the checkpoint is filled in, through
open_clip's own call; features within stated bounds of the same model unquantized on every architecture kind;
inference only, refused in one line where it cannot serve; a one-line error where torch or torchao lack it."""
from __future__ import annotations

import open_clip
import pytest
import torch

from eva_open_clip import UserError, versions
from support.checkpoints import REFERENCE_CASES, golden, needs_int8, register_reference, released_state_dict

HAS_INT8 = not needs_int8().args[0]
# the least cosine of int8 to unquantized features of the tiny reference models (random weights), as measured:
# with fp32 activations 0.9998, with bf16 0.995 (bf16's own rounding of the dequantized products)
MIN_COSINE = {'fp32': 0.9995, 'bf16': 0.99}


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp('int8')
    for case in REFERENCE_CASES:
        torch.save(released_state_dict(case), folder / f'{case}.pt')
    return folder


def _features(model, case: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    reference = golden(case)
    with torch.no_grad():
        return (model.encode_image(reference['pixels'].to(dtype), normalize=True).float(),
                model.encode_text(reference['tokens'], normalize=True).float())


@needs_int8()
@pytest.mark.parametrize('precision', ['fp32', 'bf16'])
@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_int8_features_are_close_to_the_unquantized_ones(files, case, precision):
    name, dtype = register_reference(case), {'fp32': torch.float32, 'bf16': torch.bfloat16}[precision]
    full = open_clip.create_model(name, pretrained=str(files / f'{case}.pt'), precision=precision).eval()
    model, _, preprocess = open_clip.create_model_and_transforms(
        name, pretrained=str(files / f'{case}.pt'), precision=precision, quantize='int8')
    model.eval()
    linear = [m for m in model.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and all(m.weight.qdata.dtype == torch.int8 for m in linear)  # every linear layer of the image tower
    assert all(m.c_fc.weight.qdata.dtype == torch.int8 for m in model.text.modules() if hasattr(m, 'c_fc'))
    assert model.logit_scale.dtype == model.text.token_embedding.weight.dtype == dtype  # the rest as asked
    for a, b in zip(_features(full, case, dtype), _features(model, case, dtype)):
        assert float((a * b).sum(-1).min()) >= MIN_COSINE[precision]


@needs_int8()
def test_int8_serves_inference_only(files, tmp_path):
    name = register_reference('tiny_a')
    model = open_clip.create_model(name, pretrained=str(files / 'tiny_a.pt'), quantize='int8')
    with pytest.raises(UserError, match=r'^this model has int8 weights \(quantize=int8\), for inference only'):
        model.encode_image(golden('tiny_a')['pixels'])  # training mode, gradients on
    with torch.no_grad():
        model.encode_image(golden('tiny_a')['pixels'])
    intermediates = model.eval().forward_intermediates(golden('tiny_a')['pixels'], golden('tiny_a')['tokens']) \
        if versions.open_clip_at_least((2, 32)) else None
    assert intermediates is None or len(intermediates['image_intermediates']) == 2
    from eva_open_clip.deploy import export_onnx
    with pytest.raises(UserError, match=r'^export-onnx needs the full-precision weights: load the model without '
                                        r'quantize$'):
        export_onnx(model, name, tmp_path / 'onnx')
    with pytest.raises(UserError, match=r"^quantize=int8: ViT-B-32 is not an EVA-CLIP model; quantize is for those"):
        open_clip.create_model('ViT-B-32', quantize='int8')
    with pytest.raises(UserError, match=r'^quantize=int4: choose from int8$'):
        open_clip.create_model(name, quantize='int4')


@pytest.mark.skipif(HAS_INT8, reason='this set has what int8 needs')
def test_without_what_int8_needs_the_error_names_the_release():
    with pytest.raises(UserError, match=r'^quantize=int8 needs (torch >= 2\.6 \(installed: [^)]+\)|torchao: pip '
                                        r"install 'eva_open_clip\[int8\]')$"):
        open_clip.create_model(register_reference('tiny_a'), quantize='int8')
