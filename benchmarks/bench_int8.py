"""int8 weights (`quantize='int8'`) on this machine: the largest model in the memory it has, how close the features
stay, how fast it runs on this CPU, and which model fits which memory.

    python benchmarks/bench_int8.py                    # every section (18B: ~37 GB of disk, ~20 minutes)
    python benchmarks/bench_int8.py --section fidelity

Sections (each prints one JSON line as it finishes, from a fresh process):

- `load_18b`: EVA-CLIP-18B from a generated 36.7 GB fp16 file in the released layout (every key and shape of the
  manifest), loaded in bf16 with int8 linear layers on this machine: seconds, peak RSS against the int8
  model's bytes plus what the imports took, then one image and two texts encoded.
- `fidelity`: EVA_CLIP_g_14 and EVA02-CLIP-B-16 at full size (synthetic weights whose activations depend on the
  input, as the reference checkpoints were made), int8 against the same model unquantized, in fp32 and in
  bf16: cosine of image and text features over the reference images and captions, least and mean, and
  whether zero-shot top-1 (each image against the four captions) is unchanged; and, for scale, the same for
  bf16 against fp32 without int8 (what bf16 alone changes).
- `speed`: EVA_CLIP_g_14's encode_image on this CPU at batch 1 and 8, fp32, bf16 and int8 (bf16 activations).
- `memory`: per model and precision, the weights' bytes (counted on the model built on the meta device) and
  the activations at batch 1 and 64 at its image size, estimated from the tensor sizes of one block (the
  residual, the attention's q/k/v and the MLP's hidden activations); the GPU rows are `benchmarks/gpu.py`'s.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / 'tests'))
sys.path.insert(0, str(ROOT / 'benchmarks'))
from common import run_sections  # noqa: E402

MEMORY_MODELS = ['EVA02-CLIP-B-16', 'EVA02-CLIP-L-14', 'EVA_CLIP_g_14', 'EVA02-CLIP-bigE-14', 'EVA-CLIP-8B',
                 'EVA-CLIP-18B']


def load_18b() -> dict:
    from bench_large_load import DTYPES, manifest, write_checkpoint

    import eva_open_clip  # noqa: F401 (registers the models)
    name = 'EVA-CLIP-18B'
    with tempfile.TemporaryDirectory(dir=os.environ.get('BENCH_WORKDIR')) as work:
        path = Path(work) / 'EVA_CLIP_18B_psz14_s6B.fp16.pt'
        start = time.perf_counter()
        size = write_checkpoint(path, manifest(name), DTYPES['fp16'])
        written = time.perf_counter() - start
        code = f'''
import json, time, torch, open_clip, eva_open_clip
with open('/proc/self/statm') as f:
    imports = int(f.read().split()[1]) * 4096
start = time.perf_counter()
model, _, preprocess = open_clip.create_model_and_transforms({name!r}, pretrained={str(path)!r}, precision='bf16',
                                                             quantize='int8')
seconds = time.perf_counter() - start
with open('/proc/self/status') as f:  # VmHWM: unlike ru_maxrss, not inherited from this process
    peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))
model.eval()
tokenizer = open_clip.get_tokenizer({name!r})
with torch.no_grad():
    began = time.perf_counter()
    image = model.encode_image(torch.randn(1, 3, 224, 224, dtype=torch.bfloat16), normalize=True)
    image_s = time.perf_counter() - began
    began = time.perf_counter()
    text = model.encode_text(tokenizer(['a diagram', 'a dog']), normalize=True)
    text_s = time.perf_counter() - began
int8 = sum(t.qdata.numel() + t.scale.numel() * t.scale.element_size() if hasattr(t, 'qdata') else
           t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps(dict(load_seconds=seconds, peak_rss=peak, import_rss=imports, int8_model_bytes=int8,
                      image_seconds=image_s, text_seconds=text_s, image_finite=bool(image.isfinite().all()),
                      text_finite=bool(text.isfinite().all()), embed_dim=image.shape[-1])))
'''
        run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
        if run.returncode:
            return dict(error=(run.stderr.strip().splitlines() or ['killed'])[-1])
        measured = json.loads(run.stdout.strip().splitlines()[-1])
    measured.update(file_bytes=size, write_seconds=written,
                    peak_over_int8_model_plus_imports=(measured['peak_rss']) /
                    (measured['int8_model_bytes'] + measured['import_rss']),
                    peak_minus_imports_over_int8_model=(measured['peak_rss'] - measured['import_rss']) /
                    measured['int8_model_bytes'],
                    machine_memory=os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES'))
    return dict(**measured)


def _reference_inputs(preprocess):
    from PIL import Image

    from support.checkpoints import DATA, golden
    names = golden('tiny_a')['image_names']
    pixels = torch.stack([preprocess(Image.open(DATA / 'images' / n)) for n in names])
    return pixels, golden('e02_deep_tiny_a')['captions']


def _agreement(reference: tuple, other: tuple) -> dict:
    """Cosines of `other`'s normalized (image, text) features with `reference`'s, and whether zero-shot top-1
    (each image against every caption) is the same."""
    (image, text), (image2, text2) = reference, other
    image_cos, text_cos = (image * image2).sum(-1), (text * text2).sum(-1)
    top1, top1_other = (image @ text.T).argmax(-1), (image2 @ text2.T).argmax(-1)
    return dict(image_least=round(float(image_cos.min()), 6), image_mean=round(float(image_cos.mean()), 6),
                text_least=round(float(text_cos.min()), 6), text_mean=round(float(text_cos.mean()), 6),
                top1_unchanged=bool(torch.equal(top1, top1_other)), top1=top1.tolist())


def fidelity() -> dict:
    import open_clip

    from support.checkpoints import full_size_checkpoint, manifest, synthetic_checkpoint
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for name in ('EVA02-CLIP-B-16', 'EVA_CLIP_g_14'):
            shapes = manifest(name)
            sd = full_size_checkpoint(name) if any('.rope.' in k for k in shapes) else {}
            sd.update(synthetic_checkpoint({k: s for k, s in shapes.items() if '.rope.' not in k}))
            path = Path(work) / f'{name}.pt'
            torch.save({k: sd[k] for k in shapes}, path)
            del sd
            tokenizer = open_clip.get_tokenizer(name)
            features = {}
            for precision, dtype in (('fp32', torch.float32), ('bf16', torch.bfloat16)):
                for quantize in (None, 'int8'):
                    model, _, preprocess = open_clip.create_model_and_transforms(
                        name, pretrained=str(path), precision=precision, **({'quantize': quantize} if quantize else {}))
                    model.eval()
                    pixels, captions = _reference_inputs(preprocess)
                    with torch.no_grad():  # normalized in fp64: a bf16 norm alone is off by up to ~0.4%
                        features[precision, quantize] = (
                            F.normalize(model.encode_image(pixels.to(dtype)).double(), dim=-1),
                            F.normalize(model.encode_text(tokenizer(captions)).double(), dim=-1))
                    del model
                rows.append(dict(model=name, precision=precision,
                                 **_agreement(features[precision, None], features[precision, 'int8'])))
            rows.append(dict(model=name, precision='bf16 against fp32 (no int8), for scale',
                             **_agreement(features['fp32', None], features['bf16', None])))
            path.unlink()
    return dict(rows=rows)


def speed() -> dict:
    import open_clip

    from support.checkpoints import manifest, random_checkpoint
    name = 'EVA_CLIP_g_14'
    rows = []
    with tempfile.TemporaryDirectory() as work:
        path = Path(work) / 'g14.pt'
        torch.save(random_checkpoint(manifest(name)), path)
        for precision, quantize, dtype in (('fp32', None, torch.float32), ('bf16', None, torch.bfloat16),
                                           ('bf16', 'int8', torch.bfloat16), ('fp32', 'int8', torch.float32)):
            model = open_clip.create_model(name, pretrained=str(path), precision=precision,
                                           **({'quantize': quantize} if quantize else {})).eval()
            for batch in (1, 8):
                x = torch.randn(batch, 3, 224, 224, dtype=dtype)
                with torch.no_grad():
                    model.encode_image(x[:1])
                    times = []
                    for _ in range(2):
                        start = time.perf_counter()
                        model.encode_image(x)
                        times.append(time.perf_counter() - start)
                rows.append(dict(precision=precision, quantize=quantize or 'none', batch=batch,
                                 images_per_s=round(batch / min(times), 3)))
            del model
    return dict(model=name, threads=torch.get_num_threads(), rows=rows)


def _activation_bytes(model, batch: int, value_bytes: int) -> int:
    """One block's largest live tensors at inference: the residual and its norm, q/k/v, and the MLP's hidden
    activations (two of them; three for a SwiGLU), for `batch` images."""
    trunk = model.visual.trunk
    tokens = trunk.patch_embed.num_patches + trunk.num_prefix_tokens
    width = trunk.embed_dim
    mlp = trunk.blocks[0].mlp
    hidden = (mlp.fc1_g.out_features if hasattr(mlp, 'fc1_g') else mlp.fc1.out_features)
    swiglu = 3 if hasattr(mlp, 'fc1_g') else 2
    return batch * tokens * (2 * width + 3 * width + swiglu * hidden) * value_bytes


def memory() -> dict:
    from eva_open_clip.empty_build import meta_model
    from eva_open_clip.quantize import weight_bytes
    rows = []
    for name in MEMORY_MODELS:
        model = meta_model(name)
        for precision, value_bytes, quantize in (('fp32', 4, None), ('bf16', 2, None), ('int8', 2, 'int8')):
            one, many = (_activation_bytes(model, batch, value_bytes) / 1e9 for batch in (1, 64))
            rows.append(dict(model=name, precision=precision,
                             weights_gb=round(weight_bytes(model, quantize, value_bytes) / 1e9, 2),
                             activations_batch_1_gb_estimated=round(one, 3),
                             activations_batch_64_gb_estimated=round(many, 2)))
    return dict(rows=rows)


SECTIONS = {'memory': memory, 'fidelity': fidelity, 'speed': speed, 'load_18b': load_18b}


def main() -> None:
    run_sections(__doc__, SECTIONS, __file__)


if __name__ == '__main__':
    main()
