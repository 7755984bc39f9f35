"""`export-onnx`: ONNX encoders exact under ONNX Runtime for every family layout, open_clip's tokenizer as
a `tokenizers` file, Immich's folder layout, graphs serving stacks accept, and the missing-extra line."""
from __future__ import annotations

import importlib.util
import json
import sys

import numpy as np
import open_clip
import pytest
import torch

from support.checkpoints import REFERENCE_CASES, golden, register_reference, rel_err, released_state_dict
from support.cli import main_here
from support.onnx import CORPUS, HAS_ONNX, ids, immich_tokenizer, needs_export, session

pytestmark = pytest.mark.xdist_group('onnx')  # one worker builds the module's exports


def _model(case: str, precision: str = 'fp32'):
    name = register_reference(case)
    model = open_clip.create_model(name, precision=precision)
    from eva_open_clip import convert_state_dict
    model.load_state_dict(convert_state_dict(released_state_dict(case)))
    return name, model.eval()


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """case -> (folder, fp32 open_clip model) for every reference layout, exported through the Python API."""
    from eva_open_clip.deploy import export_onnx
    folders = {}
    for case in REFERENCE_CASES:
        name, model = _model(case)
        folders[case] = export_onnx(model, name, tmp_path_factory.mktemp(case) / 'onnx'), model
    return folders


@pytest.fixture
def e02_command(tmp_path) -> list:
    """`export-onnx NAME` arguments for the e02 reference files, registered from the command line under the test
    name of its architecture (another name for the same architecture would be a second fit for its keys)."""
    (tmp_path / 'e02.json').write_text(json.dumps(golden('e02_tiny_a')['config']))
    torch.save(released_state_dict('e02_tiny_a'), tmp_path / 'e02.pt')
    name = register_reference('e02_tiny_a')
    return ['export-onnx', name, '--register', f'{name}={tmp_path / "e02.json"}']


def _images(batch: int, case: str) -> torch.Tensor:
    """`batch` random normalized images at the image size of `case`."""
    size = golden(case)['pixels'].shape[-1]
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(batch))


@needs_export
@pytest.mark.parametrize('case', REFERENCE_CASES)
@pytest.mark.parametrize('batch', [1, 7])
def test_fp32_matches_open_clip(exported, case, batch):
    folder, model = exported[case]
    images = _images(batch, case)
    texts = CORPUS[2 + batch:2 + 2 * batch]
    with torch.no_grad():
        want_image = model.encode_image(images, normalize=True)
        want_text = model.encode_text(open_clip.get_tokenizer(register_reference(case))(texts), normalize=True)
    image = session(folder / 'visual' / 'model.onnx').run(None, {'image': images.numpy()})[0]
    text = session(folder / 'textual' / 'model.onnx').run(
        None, {'text': ids(immich_tokenizer(folder), texts)})[0]
    assert image.shape == (batch, want_image.shape[1]) and image.dtype == np.float32
    assert np.abs(image - want_image.numpy()).max() <= 1e-5
    assert np.abs(text - want_text.numpy()).max() <= 1e-5


@needs_export
@pytest.mark.parametrize('case', REFERENCE_CASES)
def test_onnx_gives_the_original_implementations_features(exported, case):
    """The golden pixels and tokens, through ONNX Runtime, against the features the original code computed."""
    folder, _ = exported[case]
    g = golden(case)
    image = session(folder / 'visual' / 'model.onnx').run(None, {'image': g['pixels'].float().numpy()})[0]
    text = session(folder / 'textual' / 'model.onnx').run(None, {'text': g['tokens'].int().numpy()})[0]
    normalize = torch.nn.functional.normalize
    assert rel_err(torch.from_numpy(image), normalize(g['image_features'].float(), dim=-1)) < 1e-4
    assert rel_err(torch.from_numpy(text), normalize(g['text_features'].float(), dim=-1)) < 1e-4


@needs_export
def test_tokenizer_file_gives_open_clipids(exported):
    """Every text of the corpus: open_clip's ids up to its last <end_of_text>, then <end_of_text> padding."""
    folder, _ = exported['e02_tiny_a']
    want = open_clip.get_tokenizer(register_reference('e02_tiny_a'))(CORPUS).numpy()
    got = ids(immich_tokenizer(folder), CORPUS)
    eot = 49407
    assert got.shape == want.shape == (len(CORPUS), 77)
    for text, w, g in zip(CORPUS, want, got):
        end = int(np.nonzero(w == eot)[0][-1]) + 1
        assert g[:end].tolist() == w[:end].tolist(), text
        assert (g[end:] == eot).all(), text
    assert (want[-2:, -1] == eot).all() and (got[-2:] != eot).sum() == 2 * 76  # truncated, ends in <end_of_text>


@needs_export
def test_end_of_text_padding_gives_open_clips_embedding(exported):
    """open_clip pads with 0, the file with <end_of_text>: the embeddings of the two agree."""
    folder, model = exported['e02_tiny_a']
    tokens = open_clip.get_tokenizer(register_reference('e02_tiny_a'))(CORPUS[:9])
    padded = ids(immich_tokenizer(folder), CORPUS[:9])
    assert (tokens.numpy() != padded).any()
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=True).numpy()
        zeros_padded = model.encode_text(torch.from_numpy(padded).long(), normalize=True).numpy()
    assert np.abs(zeros_padded - want).max() <= 1e-6
    got = session(folder / 'textual' / 'model.onnx').run(None, {'text': padded})[0]
    assert np.abs(got - want).max() <= 1e-5


@needs_export
def test_immich_layout(exported):
    """The files and keys Immich's OpenClipVisualEncoder and OpenClipTextualEncoder read."""
    import onnx
    folder, model = exported['e02_tiny_a']
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file()) == [
        'config.json', 'textual/model.onnx', 'textual/tokenizer.json', 'textual/tokenizer_config.json',
        'visual/model.onnx', 'visual/preprocess_cfg.json']
    config = json.loads((folder / 'config.json').read_text())
    assert config == json.loads(json.dumps(open_clip.get_model_config(register_reference('e02_tiny_a'))))
    assert config['text_cfg']['context_length'] == 77
    preprocess = json.loads((folder / 'visual' / 'preprocess_cfg.json').read_text())
    assert preprocess == json.loads(json.dumps(dict(model.visual.preprocess_cfg)))
    assert preprocess['size'] == [64, 64] and preprocess['interpolation'] == 'bicubic'
    assert preprocess['resize_mode'] == 'shortest' and len(preprocess['mean']) == len(preprocess['std']) == 3
    assert json.loads((folder / 'textual' / 'tokenizer_config.json').read_text())['pad_token'] == '<end_of_text>'
    for part, name, dtype, width in (('visual', 'image', onnx.TensorProto.FLOAT, 64),
                                     ('textual', 'text', onnx.TensorProto.INT32, 77)):
        graph = onnx.load(str(folder / part / 'model.onnx'), load_external_data=False).graph
        (given,) = graph.input
        dims = given.type.tensor_type.shape.dim
        assert given.name == name and given.type.tensor_type.elem_type == dtype
        assert dims[0].dim_param and dims[-1].dim_value == width  # a dynamic batch
        assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT


@needs_export
def test_graphs_pass_the_checker_and_hold_no_rejected_op(exported):
    import onnx

    from eva_open_clip.deploy.graphs import FORBIDDEN_OPS, OPSET, op_counts
    for case, (folder, _) in exported.items():
        for part in ('visual', 'textual'):
            path = folder / part / 'model.onnx'
            onnx.checker.check_model(str(path), full_check=True)
            ops = op_counts(path)
            assert not set(ops) & FORBIDDEN_OPS, (case, part, ops)
            assert 'MatMul' in ops
            imports = {o.domain: o.version for o in onnx.load(str(path), load_external_data=False).opset_import}
            assert imports[''] == OPSET


@needs_export
def test_external_data_export_loads_and_matches(tmp_path):
    """Weights above the threshold go to model.onnx.data beside the graph (forced here on a tiny model)."""
    from eva_open_clip.deploy import export_onnx
    name, model = _model('rms_tiny_a')
    folder = export_onnx(model, name, tmp_path / 'onnx', external_data_threshold=1024)
    import onnx
    for part in ('visual', 'textual'):
        graph, data = folder / part / 'model.onnx', folder / part / 'model.onnx.data'
        stored = onnx.load(str(graph), load_external_data=False).graph.initializer
        matrices = [t for t in stored if len(t.dims) >= 2 and t.dims[-1] * t.dims[-2] >= 4096]
        assert matrices and all(t.data_location == onnx.TensorProto.EXTERNAL for t in matrices)
        assert data.stat().st_size > graph.stat().st_size
    images = _images(7, 'rms_tiny_a')
    with torch.no_grad():
        want = model.encode_image(images, normalize=True).numpy()
    got = session(folder / 'visual' / 'model.onnx').run(None, {'image': images.numpy()})[0]
    assert np.abs(got - want).max() <= 1e-5


@needs_export
@pytest.mark.parametrize('case', ['e02_tiny_a', 'rmspost_tiny_a'])
def test_fp16_export(tmp_path, case):
    """Weights and compute in fp16, float32 in and out: cosine to the fp32 features at least 0.999.

    On the CPU provider ONNX Runtime >= 1.24 crashes optimizing the fp16 text graph at its default level
    (its NchwcTransformer on the Cast it inserts before a MatMul, onnxruntime#28392); fp16 is for GPU
    providers, and this CPU check runs the text graph one level lower."""
    from eva_open_clip.deploy import export_onnx
    name, model16 = _model(case, precision='pure_fp16')
    _, model = _model(case)
    folder = export_onnx(model16, name, tmp_path / 'onnx')
    images = _images(7, case)
    texts = open_clip.get_tokenizer(name)(CORPUS[2:9])
    with torch.no_grad():
        want_image, want_text = model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)
    image = session(folder / 'visual' / 'model.onnx').run(None, {'image': images.numpy()})[0]
    text = session(folder / 'textual' / 'model.onnx', 'ORT_ENABLE_EXTENDED').run(
        None, {'text': texts.int().numpy()})[0]
    assert image.dtype == text.dtype == np.float32
    assert (image * want_image.numpy()).sum(-1).min() >= 0.999
    assert (text * want_text.numpy()).sum(-1).min() >= 0.999


@needs_export
def test_command_line_export_with_int8(tmp_path, e02_command):
    """The command, with a registered config and --quantize int8: MatMulInteger graphs that track fp32."""
    from eva_open_clip.deploy.graphs import op_counts
    out = tmp_path / 'int8'
    result = main_here(*e02_command, out, '--pretrained', tmp_path / 'e02.pt', '--quantize', 'int8')
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f'wrote {out}: int8')
    assert sorted(p.name for p in (out / 'visual').iterdir()) == ['model.onnx', 'preprocess_cfg.json']
    assert op_counts(out / 'visual' / 'model.onnx')['MatMulInteger'] > 0
    _, model = _model('e02_tiny_a')
    images = _images(7, 'e02_tiny_a')
    with torch.no_grad():
        want = model.encode_image(images, normalize=True).numpy()
    got = session(out / 'visual' / 'model.onnx').run(None, {'image': images.numpy()})[0]
    assert (got * want).sum(-1).min() >= 0.98


@pytest.mark.parametrize('args, line', [
    (['--dtype', 'fp16', '--quantize', 'int8'], '--quantize int8 quantizes the fp32 model: drop --dtype fp16'),
    (['--pretrained', 'nofile.pt'], '--pretrained nofile.pt: no such file'),
])
def test_usage_errors(tmp_path, e02_command, args, line):
    args = ['--pretrained', tmp_path / 'e02.pt'] + args if '--pretrained' not in args else args
    result = main_here(*e02_command, tmp_path / 'out', *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f'eva-open-clip export-onnx: {line}') and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / 'out').exists()


def test_not_an_eva_model_and_a_full_folder(tmp_path, e02_command):
    result = main_here('export-onnx', 'ViT-B-32', tmp_path / 'out', '--pretrained', 'openai')
    assert (result.returncode, result.stderr) == (2, 'eva-open-clip export-onnx: ViT-B-32: not an EVA-CLIP model '
                                                     '(`eva-open-clip models` lists them)\n')
    (tmp_path / 'out').mkdir()
    (tmp_path / 'out' / 'mine.txt').write_text('kept')
    result = main_here(*e02_command, tmp_path / 'out', '--pretrained', tmp_path / 'e02.pt')
    assert (result.returncode, result.stderr) == (
        2, f'eva-open-clip export-onnx: {tmp_path / "out"} exists and is not empty (use --force to replace it)\n')
    assert (tmp_path / 'out' / 'mine.txt').read_text() == 'kept'


def test_without_the_extra(tmp_path, monkeypatch, e02_command):
    """Without the onnx extra (or on a torch older than 2.6) the command says in one line what to install."""
    if HAS_ONNX:  # make this environment one without the extra: its imports fail as if not installed
        for name in ('onnx', 'onnxruntime'):
            monkeypatch.setitem(sys.modules, name, None)
    result = main_here(*e02_command, tmp_path / 'out', '--pretrained', tmp_path / 'e02.pt')
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1
    missing = [m for m in ('onnx', 'onnxruntime', 'onnxscript', 'tokenizers')
               if m in ('onnx', 'onnxruntime') and HAS_ONNX or importlib.util.find_spec(m) is None]
    assert result.stderr == (f"eva-open-clip export-onnx: export-onnx needs {', '.join(missing)}: "
                             "pip install 'eva_open_clip[onnx]'\n")
    assert not (tmp_path / 'out').exists()


@needs_export
def test_int8_with_external_data_files_have_the_usual_mode(tmp_path):
    """ONNX Runtime's quantizer writes its external data 0600; the export gives every file the mode open() gives."""
    from eva_open_clip.deploy import export_onnx
    from eva_open_clip.durable import new_file_mode
    name, model = _model('e02_tiny_a')
    folder = export_onnx(model, name, tmp_path / 'onnx', quantize='int8', external_data_threshold=1024)
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob('*') if p.is_file())
    assert 'visual/model.onnx.data' in files and 'textual/model.onnx.data' in files
    assert {(folder / f).stat().st_mode & 0o777 for f in files} == {new_file_mode()}
    images = _images(7, 'e02_tiny_a')
    with torch.no_grad():
        want = model.encode_image(images, normalize=True).numpy()
    got = session(folder / 'visual' / 'model.onnx').run(None, {'image': images.numpy()})[0]
    assert (got * want).sum(-1).min() >= 0.98
