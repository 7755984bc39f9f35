"""`quantize='int8'`: the linear layers' weights as int8 (torchao), quantized as the checkpoint is filled in, through
open_clip's own call; features within stated bounds of the same model unquantized on every architecture kind;
inference only, refused in one line where it cannot serve; a one-line error where torch or torchao lack it."""
from __future__ import annotations

import json
import subprocess
import sys

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


# a fresh process: what its imports take (torchao's included), then its peak while loading g/14 in int8
_PEAK = r'''
import json, sys
import open_clip, torch, torchao.quantization
import eva_open_clip
from eva_open_clip.quantize import weight_bytes
with open('/proc/self/statm') as f:
    imports = int(f.read().split()[1]) * 4096
model = open_clip.create_model('EVA_CLIP_g_14', pretrained=sys.argv[1], precision='bf16', quantize='int8')
with open('/proc/self/status') as f:  # VmHWM: unlike ru_maxrss, not inherited from the parent process
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
print(json.dumps(dict(imports=imports, peak=peak, int8=weight_bytes(model, 'int8'), bf16=weight_bytes(model))))
'''


@needs_int8()
@pytest.mark.full_size
def test_an_int8_load_never_holds_a_full_precision_copy(g14_checkpoint):
    """g/14 from its 2.3 GB fp16 file: the peak over the imports stays near the int8 model's bytes (1.08x
    measured; 1.66x before freed scratch was returned to the system), far under the bf16 model's."""
    run = subprocess.run([sys.executable, '-c', _PEAK, str(g14_checkpoint)], capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    loading = measured['peak'] - measured['imports']
    assert loading <= 1.15 * measured['int8'], measured
    assert loading <= 0.6 * measured['bf16'], measured


@pytest.mark.skipif(HAS_INT8, reason='this set has what int8 needs')
def test_without_what_int8_needs_the_error_names_the_release():
    with pytest.raises(UserError, match=r'^quantize=int8 needs (torch >= 2\.6 \(installed: [^)]+\)|torchao: pip '
                                        r"install 'eva_open_clip\[int8\]')$"):
        open_clip.create_model(register_reference('tiny_a'), quantize='int8')
