"""A newcomer's first hour: every mistake is one line with a way forward and the right exit status.

Most cases run the command line's entry point in this process (`cli.main`); the cases that depend on
the environment (hub cache, network, imports) run it in a new interpreter.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import eva_open_clip
from eva_open_clip.classify import BUNDLED_IMAGE
from eva_open_clip.registry import BUILTIN_MODELS
from eva_open_clip.runtime.progress import Progress
from support.checkpoints import DATA, fake_hub_cache, golden, register_reference, released_state_dict
from support.cli import main_here, only_line, run_cli

ROOT = Path(__file__).resolve().parents[2]


def run_here(*args) -> tuple[int, str, str]:
    """(exit status, standard output, standard error) of `eva-open-clip ARGS`, run in this process."""
    result = main_here(*args)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """tiny_a (an EVA01 layout) and e02_tiny_a (EVA02) as config and checkpoint files, and an image."""
    folder = tmp_path_factory.mktemp('first-hour')
    for case in ('tiny_a', 'e02_tiny_a'):
        (folder / f'{case}.json').write_text(json.dumps(golden(case)['config']))
        torch.save(released_state_dict(case), folder / f'{case}.pt')
    (folder / 'x.png').write_bytes(BUNDLED_IMAGE.read_bytes())
    (folder / 'broken.pt').write_bytes(b'not a checkpoint')  # found only when the model is loaded
    return folder


def tiny_args(files: Path, pretrained: str | None = None) -> list[str]:
    return ['--register', f'test-tiny_a={files / "tiny_a.json"}', '--model', 'test-tiny_a',
            '--pretrained', pretrained or str(files / 'tiny_a.pt'), '--device', 'cpu']


# 1. every mistake is one line, never a traceback

def test_missing_labels_file(files):
    result = main_here('classify', files / 'x.png', '--labels-file', files / 'nofile.txt', *tiny_args(files))
    line = only_line(result, 2)
    assert line == f'eva-open-clip classify: --labels-file {files / "nofile.txt"}: No such file or directory'


def test_register_of_a_missing_config(files):
    line = only_line(main_here('run', '--register', f't={files / "nofile.json"}', '-m', 'json.tool'), 2)
    assert line == f'eva-open-clip run: {files / "nofile.json"}: No such file or directory'
    line = only_line(main_here('run', '--register', 'no-equals-sign', '-m', 'json.tool'), 2)
    assert line == "eva-open-clip run: --register takes NAME=CONFIG.json, got 'no-equals-sign'"
    assert only_line(main_here('run', '-m', 'no_such_module_here'), 2) == \
        'eva-open-clip run: -m no_such_module_here: no module of that name is installed in this environment'
    assert only_line(main_here('run'), 2).startswith('eva-open-clip run: give -m MODULE or a SCRIPT to run')


@pytest.mark.parametrize('content,problem', [
    (None, 'No such file or directory'),
    ('{"embed_dim": 8,', 'not a JSON file'),
    ('{"embed_dim": 8, "vision_cfg": {}, "text_cfg": {}, "colour": 1}', "unsupported EVA-CLIP config key 'colour'"),
    ('wrong type', 'not a usable EVA-CLIP config (ValueError: '),
])
def test_convert_with_a_bad_config(files, tmp_path, content, problem):
    config = tmp_path / 'custom.json'
    if content == 'wrong type':
        cfg = golden('tiny_a')['config']
        cfg['vision_cfg']['width'] = 'wide'
        content = json.dumps(cfg)
    if content is not None:
        config.write_text(content)
    line = only_line(main_here('convert', files / 'tiny_a.pt', tmp_path / 'out', '--model', 'fh_custom',
                            '--config', config), 2)
    assert line.startswith(f'eva-open-clip convert: {config}: {problem}'), line
    assert not (tmp_path / 'out').exists()


def test_convert_of_a_missing_checkpoint(tmp_path):
    line = only_line(main_here('convert', tmp_path / 'eva_clip_psz14.pt', tmp_path / 'out'), 2)
    assert line == f'eva-open-clip convert: {tmp_path / "eva_clip_psz14.pt"}: no such file'
    assert not (tmp_path / 'out').exists()


def test_convert_config_needs_a_model_name(files, tmp_path):
    line = only_line(main_here('convert', files / 'tiny_a.pt', tmp_path / 'out', '--config', files / 'tiny_a.json'), 2)
    assert line == 'eva-open-clip convert: --config needs --model NAME to register it under'


@pytest.mark.parametrize('device,problem', [
    ('gpu', 'not a torch device; give cpu, cuda, cuda:N or mps'),
    ('meta', 'this tool runs on cpu, cuda, cuda:N or mps'),
    ('cuda', None), ('cuda:7', None),
])
def test_a_device_torch_cannot_use_here(files, device, problem):
    """Refused before the model loads: the checkpoint given would fail to load, and is never reached."""
    if problem is None:
        if torch.cuda.is_available() and torch.cuda.device_count() > 7:
            pytest.skip('this machine has the GPU named')
        problem = ('torch finds no CUDA GPU or driver on this machine; give --device cpu' if torch.version.cuda
                   else f'this torch ({torch.__version__}) is built without CUDA; give --device cpu')
        if torch.cuda.is_available():
            problem = f'this machine has {torch.cuda.device_count()} CUDA GPU(s)'
    args = tiny_args(files, str(files / 'broken.pt'))[:-1] + [device]
    line = only_line(main_here('classify', files / 'x.png', *args), 2)
    assert line.startswith(f'eva-open-clip classify: --device {device}: {problem}'), line


def test_a_file_of_another_architecture_names_both(files, b16_checkpoint):
    """open_clip's own EVA02-B-16 (timm's re-converted weights) given a released file: open_clip's
    AssertionError becomes one line naming the file, the model, and the model the file fits."""
    line = only_line(main_here('classify', files / 'x.png', '--model', 'EVA02-B-16', '--pretrained', b16_checkpoint,
                                 '--device', 'cpu'), 1)
    assert line.startswith(f'eva-open-clip classify: --pretrained {b16_checkpoint} does not fit --model EVA02-B-16 (')
    assert line.endswith('; its keys and shapes are those of EVA02-CLIP-B-16: give --model EVA02-CLIP-B-16')
    fits = register_reference('e02_tiny_a')  # a registered custom architecture is named too
    line = only_line(main_here('classify', files / 'x.png', '--model', 'EVA02-B-16',
                                 '--pretrained', files / 'e02_tiny_a.pt', '--device', 'cpu'), 1)
    assert line.endswith(f'; its keys and shapes are those of {fits}: give --model {fits}')
    odd = released_state_dict('e02_tiny_a')
    odd['visual.extra.weight'] = torch.zeros(2)  # fits no registered model
    torch.save(odd, files / 'odd.pt')
    line = only_line(main_here('classify', files / 'x.png', '--model', 'EVA02-B-16',
                                 '--pretrained', files / 'odd.pt', '--device', 'cpu'), 1)
    assert line.endswith('give the --model it was made for (a custom architecture: --register NAME=CONFIG.json '
                         '--model NAME)')


def test_inputs_are_checked_before_the_model_is_loaded(files, tmp_path):
    """The checkpoint given is damaged: each mistake below is found first, with nothing written."""
    broken = tiny_args(files, str(files / 'broken.pt'))
    out = tmp_path / 'out.npy'
    line = only_line(main_here('embed', '--text-file', tmp_path / 'nope.txt', '--out', out, *broken), 2)
    assert line == f'eva-open-clip embed: --text-file {tmp_path / "nope.txt"}: No such file or directory'
    line = only_line(main_here('embed', tmp_path / 'missing.png', '--out', out, *broken), 2)
    assert str(tmp_path / 'missing.png') in line
    line = only_line(main_here('classify', tmp_path / 'missing.png', *broken), 2)
    assert str(tmp_path / 'missing.png') in line
    (tmp_path / 'a.tar').write_bytes(b'')
    line = only_line(main_here('classify', tmp_path / 'a.tar', *broken), 2)
    assert line.endswith('a.tar is a tar shard: classify takes image files and folders of them '
                         '(`eva-open-clip embed` reads shards)')
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.out.npy.lock', 'a.tar']  # no output, no scratch
    # and the damaged checkpoint itself is a failure during the run, named
    assert only_line(main_here('classify', files / 'x.png', *broken), 1).startswith(
        f'eva-open-clip classify: {files / "broken.pt"}: ')


# 2. exit statuses: usage errors before loading are 2; nothing to show is 1

def test_unknown_model_suggests_the_closest(files):
    line = only_line(main_here('classify', '--model', 'EVA02-CLIP-B16'), 2)
    assert line.startswith("eva-open-clip classify: --model EVA02-CLIP-B16: no such model; did you mean "
                           "'EVA02-CLIP-B-16'")
    assert '`eva-open-clip models` lists the EVA-CLIP models' in line
    line = only_line(main_here('embed', files / 'x.png', '--out', files / 'o.npy', '--model', 'zzqx'), 2)
    assert line == ('eva-open-clip embed: --model zzqx: no such model (`eva-open-clip models` lists the EVA-CLIP '
                    'models; a custom config: --register zzqx=CONFIG.json)')


@pytest.mark.parametrize('template', ['a photo', 'a {0} and {1}', 'a {label}', 'a {'])
def test_bad_template_is_a_usage_error(files, template):
    line = only_line(main_here('classify', files / 'x.png', '--template', template,
                            *tiny_args(files, str(files / 'broken.pt'))), 2)
    assert line.startswith(f"eva-open-clip classify: --template {template!r}: write '{{}}' where the label goes")


def test_classify_with_nothing_decodable_fails_in_one_line(files, tmp_path):
    for name in ('a.png', 'b.jpg'):
        (tmp_path / name).write_bytes(b'not an image')
    code, out, err = run_here('classify', tmp_path, *tiny_args(files))
    assert (code, out) == (1, '')
    assert err.strip() == f'eva-open-clip classify: none of the 2 image(s) could be decoded, e.g. {tmp_path / "a.png"}'


# 3. a custom model on the command line; the models command; suggestions from Python too

def test_register_on_classify_gives_the_api_probabilities(files):
    code, out, err = run_here('classify', files / 'x.png', '--labels', 'a diagram', 'a dog', '--json',
                              *tiny_args(files))
    assert code == 0, err
    [entry] = json.loads(out)
    model, _, preprocess = open_clip.create_model_and_transforms('test-tiny_a', pretrained=str(files / 'tiny_a.pt'))
    model.eval()
    tokenizer = open_clip.get_tokenizer('test-tiny_a')
    with torch.no_grad():
        image = model.encode_image(preprocess(Image.open(files / 'x.png')).unsqueeze(0), normalize=True)
        text = model.encode_text(tokenizer(['a diagram', 'a dog']), normalize=True)
        probs = (model.logit_scale.exp() * image @ text.T).softmax(-1)[0].tolist()
    got = {x['label']: x['prob'] for x in entry['labels']}
    assert [got['a diagram'], got['a dog']] == pytest.approx(probs, abs=1e-6)


def test_models_lists_names_tags_files_and_the_cache(files, tmp_path):
    cached = fake_hub_cache(tmp_path / 'cache', 'QuanSun/EVA-CLIP/EVA02_CLIP_B_psz16_s8B.pt', b'weights')
    env = {'HF_HUB_CACHE': str(tmp_path / 'cache'), 'HF_HUB_OFFLINE': '1'}
    result = run_cli('models', '--json', '--register', f'test-tiny_a={files / "tiny_a.json"}', env=env)
    assert result.returncode == 0, result.stderr
    rows = {r['model']: r for r in json.loads(result.stdout)}
    assert list(rows) == [*(r.name for r in BUILTIN_MODELS), 'test-tiny_a']
    for release in BUILTIN_MODELS:
        assert rows[release.name] == dict(model=release.name, tag=release.tag, params=release.params,
                                          bf16=f'{release.bf16_gb:g} GB', int8=f'{release.int8_gb:g} GB',
                                          hub_file=release.hub_file, file_size=release.file_size,
                                          cached=str(cached) if release.name == 'EVA02-CLIP-B-16' else None)
    model = open_clip.create_model(register_reference('tiny_a'))
    n = sum(p.numel() for p in model.parameters())
    assert rows['test-tiny_a'] == dict(model='test-tiny_a', tag=None, params=f'{n / 1e6:.3g}M',
                                       bf16=f'{round(2 * n / 1e9, 2):g} GB', int8='0 GB', hub_file=None,
                                       file_size=None, cached=None)
    table = run_cli('models', env=env)
    assert table.returncode == 0 and 'Traceback' not in table.stderr and 'eva-open-clip' not in table.stderr
    b16 = next(line for line in table.stdout.splitlines() if line.startswith('EVA02-CLIP-B-16 '))
    assert b16.split() == ['EVA02-CLIP-B-16', 'merged2b_s8b_b131k', '150M', '0.3', 'GB', '0.19', 'GB',
                           'QuanSun/EVA-CLIP/EVA02_CLIP_B_psz16_s8B.pt', '0.3', 'GB', 'yes']
    assert table.stdout.splitlines()[1].split()[-1] == 'no'


def test_the_parameter_counts_and_memory_listed_are_the_built_models():
    from eva_open_clip.empty_build import meta_model
    from eva_open_clip.quantize import weight_bytes
    for release in BUILTIN_MODELS:
        model = meta_model(release.name)
        n = sum(p.numel() for p in model.parameters())
        shown = f'{n / 1e9:.3g}B' if n >= 1e9 else f'{n / 1e6:.3g}M'
        assert release.params in (shown, f'{n / 1e9:.2f}B', f'{n / 1e9:.1f}B'), (release.name, n)
        assert (release.bf16_gb, release.int8_gb) == (round(weight_bytes(model) / 1e9, 2),
                                                      round(weight_bytes(model, 'int8') / 1e9, 2)), release.name


def test_a_misspelled_tag_from_python_lists_the_tags():
    with pytest.raises(eva_open_clip.UserError) as error:
        open_clip.create_model_and_transforms('EVA02-CLIP-B-16', pretrained='merged2b_s8b')
    assert str(error.value) == ("merged2b_s8b: no such file, nor a pretrained tag of EVA02-CLIP-B-16 (its tags: "
                                "merged2b_s8b_b131k); did you mean 'merged2b_s8b_b131k'?")
    assert isinstance(error.value, eva_open_clip.CheckpointError)
    line = only_line(main_here('classify', '--model', 'EVA02-CLIP-B-16', '--pretrained', 'laion2b'), 2)
    assert line == ('eva-open-clip classify: --pretrained laion2b: no such file, nor a pretrained tag of '
                    'EVA02-CLIP-B-16 (its tags: merged2b_s8b_b131k)')


# 4. offline: a tag whose file is not cached fails at once; a cached one needs no network

def test_an_unreachable_hub_fails_at_once_saying_what_to_do(tmp_path):
    env = {'HF_HUB_CACHE': str(tmp_path / 'empty'), 'HF_ENDPOINT': 'http://127.0.0.1:9'}  # nothing listens there
    result = run_cli('classify', '--model', 'EVA02-CLIP-B-16', env=env)
    assert result.returncode == 1 and 'Retry' not in result.stderr  # one request, no retries
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('eva-open-clip classify: --pretrained merged2b_s8b_b131k: '
                           'QuanSun/EVA-CLIP/EVA02_CLIP_B_psz16_s8B.pt is not cached and the Hugging Face hub '
                           'cannot be reached (')
    assert line.endswith('Download EVA02_CLIP_B_psz16_s8B.pt where there is network and pass --pretrained '
                         '/path/to/EVA02_CLIP_B_psz16_s8B.pt; on machines without network set HF_HUB_OFFLINE=1 so '
                         'that nothing waits for the hub')


def test_a_cached_tag_loads_without_network(files, tmp_path):
    """A tag of a custom model whose file is in the cache: classified with the hub unreachable."""
    fake_hub_cache(tmp_path / 'cache', 'example/tiny/tiny_a.pt', (files / 'tiny_a.pt').read_bytes())
    script = tmp_path / 'classify_cached.py'
    script.write_text(
        'import sys, eva_open_clip\n'
        'from eva_open_clip import cli\n'
        f'eva_open_clip.register_eva_model("test-tiny_a", {str(files / "tiny_a.json")!r}, '
        'pretrained={"demo": "example/tiny/tiny_a.pt"})\n'
        f'sys.exit(cli.main(["classify", {str(files / "x.png")!r}, "--model", "test-tiny_a", "--json"]))\n')
    env = {'HF_HUB_CACHE': str(tmp_path / 'cache'), 'HF_ENDPOINT': 'http://127.0.0.1:9'}
    result = run_cli('run', script, env=env)
    assert result.returncode == 0, result.stderr
    by_tag = json.loads(result.stdout)
    by_path = json.loads(main_here('classify', files / 'x.png', *tiny_args(files), '--json').stdout)
    assert [x['label'] for x in by_tag[0]['labels']] == [x['label'] for x in by_path[0]['labels']]
    assert [x['prob'] for x in by_tag[0]['labels']] == pytest.approx([x['prob'] for x in by_path[0]['labels']],
                                                                     abs=1e-6)


# 6. arguments are parsed and usage errors reported before any tool module is imported

def test_usage_errors_import_no_tool_module(tmp_path):
    code = (
        'import contextlib, io, sys\n'
        'from eva_open_clip import cli\n'
        'for argv in (["--help"], ["embed", "--help"], ["embed", "--out", "x.npy"], ["classify", "--model", "nope"],\n'
        '             ["embed", "x.png", "--out", "x.npy", "--batch-size", "0"], ["classify", "--template", "x"],\n'
        '             ["classify", "--device", "gpu"], ["models", "--json"]):\n'
        '    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n'
        '        try:\n'
        '            cli.main(argv)\n'
        '        except SystemExit:\n'
        '            pass\n'
        'heavy = ("pyarrow", "webdataset", "eva_open_clip.embed.inputs", "eva_open_clip.embed.loader",\n'
        '         "eva_open_clip.embed.store.folder", "eva_open_clip.embed.store.npy_file",\n'
        '         "eva_open_clip.embed.folder_job", "eva_open_clip.embed.npy_job", "eva_open_clip.runtime.encoder")\n'
        'print(sorted(m for m in heavy if m in sys.modules))\n')
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env=dict(os.environ, HF_HUB_OFFLINE='1', HF_HUB_CACHE=str(tmp_path / 'cache')))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


# 7. the same progress and final lines in both output modes; --quiet everywhere; plain text

def test_npy_output_is_quiet_or_plain_and_ends_in_one_line(files, tmp_path):
    images = tmp_path / 'images'
    images.mkdir()
    for name in ('palette_120.png', 'noise_gray_64x96.png'):
        (images / name).write_bytes((DATA / 'images' / name).read_bytes())
    (images / 'broken.png').write_bytes(b'not an image')
    args = ('embed', images, '--workers', '0', *tiny_args(files))
    code, _, quiet = run_here(*args, '--out', tmp_path / 'q.npy', '--quiet')
    assert code == 0
    assert quiet.strip().splitlines() == [
        f'warning: skipped 1 sample(s): {images / "broken.png"} (undecodable_image)',
        f'embedded 2 samples into {tmp_path / "q.npy"} and {tmp_path / "q.paths.txt"} (1 skipped: undecodable_image 1)']
    code, _, logged = run_here(*args, '--out', tmp_path / 'p.npy', '--progress-interval', '0')
    assert code == 0 and '\r' not in logged
    assert [line for line in logged.splitlines() if line.startswith('progress: ')][-1].startswith(
        'progress: 3/3 images done, ')
    assert np.array_equal(np.load(tmp_path / 'q.npy'), np.load(tmp_path / 'p.npy'))
    code, _, text = run_here('embed', '--text-file', DATA / 'README.md', '--out', tmp_path / 't.npy',
                         '--quiet', *tiny_args(files))
    lines = [line for line in (DATA / 'README.md').read_text().splitlines() if line.strip()]
    assert code == 0 and text.strip() == (f'embedded {len(lines)} samples into {tmp_path / "t.npy"} and '
                                          f'{tmp_path / "t.paths.txt"} (none skipped)')


def test_folder_output_final_line_and_summary(files, tmp_path):
    image = tmp_path / 'one.png'
    image.write_bytes((DATA / 'images' / 'palette_120.png').read_bytes())
    out = tmp_path / 'out'
    code, _, err = run_here('embed', image, '--out', out, '--workers', '0', '--quiet', *tiny_args(files))
    assert code == 0, err
    assert err.strip().splitlines()[-1] == \
        f'embedded 1 sample of 1 unit into {out} (none skipped); this run: 1 sample on 1 rank'
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['ranks'][0]['images_per_s'] is None  # one batch: no rate after the first batch to give
    assert not (out / 'text_emb').exists()  # no captions, no text_emb/
    assert sorted(p.name for p in out.iterdir()) == ['.lock', 'embed.json', 'img_emb', 'metadata', 'ranks', 'shards',
                                                     'summary.json', 'units.jsonl']


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_bar_ends_complete(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, 'stderr', terminal)
    done = [0]
    progress = Progress(5, 'unit', lambda: done[0], interval=3600)
    progress.update(10)
    done[0] = 5  # every unit finished between two refreshes
    progress.close()
    last = re.split(r'[\r\n]', terminal.getvalue().strip())[-1]
    assert '100%' in last and '5/5' in last and '10 images by this process' in last


# 10. the README's example runs as pasted

def test_the_readme_open_clip_example_runs_as_pasted(b16_checkpoint):
    """The README's example, with the checkpoint a path instead of the tag (no network) and EVA02-CLIP-B-16
    for the g/14 (same code); its probabilities are those of `classify`."""
    readme = (ROOT / 'README.md').read_text()
    section = readme[readme.index('## Example'):]
    start = section.index('```python\n') + len('```python\n')
    snippet = section[start:section.index('\n```', start)]
    assert "pretrained='laion400m_s11b_b41k'" in snippet and 'import open_clip' in snippet
    runnable = snippet.replace("'EVA_CLIP_g_14'", "'EVA02-CLIP-B-16'").replace(
        "pretrained='laion400m_s11b_b41k'", f'pretrained={str(b16_checkpoint)!r}')
    namespace: dict = {}
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(runnable, 'README.md', 'exec'), namespace)
    code, out, err = run_here('classify', '--model', 'EVA02-CLIP-B-16', '--pretrained', b16_checkpoint,
                              '--device', 'cpu', '--json')
    assert code == 0, err
    got = {x['label']: x['prob'] for x in json.loads(out)[0]['labels']}
    assert namespace['probs'][0].tolist() == pytest.approx([got['a diagram'], got['a dog'], got['a cat']], abs=1e-5)


# more of the first hour: a file taken for a label, Ctrl-C, a GPU out of memory

def test_an_image_after_labels_is_not_taken_for_a_label(files):
    line = only_line(main_here('classify', '--labels', 'a cat', 'a dog', files / 'x.png', *tiny_args(files)), 2)
    assert line == (f'eva-open-clip classify: --labels took {files / "x.png"}, a file, for a label: give the images '
                    f'before --labels (classify {files / "x.png"} --labels ...)')


def test_ctrl_c_is_one_line(files, tmp_path):
    import signal
    fifo = tmp_path / 'labels'
    os.mkfifo(fifo)
    job = run_cli('classify', files / 'x.png', '--labels-file', fifo, *tiny_args(files), background=True)
    writer = os.open(fifo, os.O_WRONLY)  # returns once the command has opened the list: it now waits in read()
    try:
        job.send_signal(signal.SIGINT)
        _, stderr = job.communicate(timeout=60)
    finally:
        os.close(writer)
    assert job.returncode == 128 + signal.SIGINT
    assert 'Traceback' not in stderr  # (the oldest set's open_clip imports print warnings of their own first)
    assert [line for line in stderr.splitlines() if line.startswith('eva-open-clip')] == \
        ['eva-open-clip classify: interrupted']


class _OutOfMemory(torch.nn.Module):
    """A model whose GPU runs out of memory on every batch."""

    logit_scale = torch.nn.Parameter(torch.zeros(()))

    def encode_image(self, pixels, normalize=False):
        raise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 20.00 GiB')


def test_a_gpu_out_of_memory_says_to_lower_the_batch_size(tmp_path):
    from eva_open_clip.errors import COMMAND_LINE, ToolError
    from eva_open_clip.runtime.encoder import Encoder
    encoder = Encoder(_OutOfMemory(), None, None, 'cpu', 'fp32')
    with pytest.raises(ToolError) as error:
        encoder.encode_pixels(torch.zeros(64, 3, 8, 8))
    assert error.value.spelled(COMMAND_LINE) == ('cpu ran out of memory on a batch of 64: give a smaller --batch-size '
                                                 '(an output folder resumes where it stopped), or --precision bf16')
    assert str(error.value) == ('cpu ran out of memory on a batch of 64: give a smaller batch_size (an output folder '
                                'resumes where it stopped), or precision=bf16')  # a Python caller's terms


# 8. no more decoding workers than units

class _CountingWorkers(torch.nn.Module):
    """Stands in for the model: each batch's features from its pixels; counts the decoding workers alive."""

    def __init__(self):
        super().__init__()
        self.workers_seen = set()

    @staticmethod
    def preprocess(image):
        return torch.full((3, 4, 4), float(image.size[0]))

    def encode_image(self, pixels, normalize=False):
        import multiprocessing
        self.workers_seen.add(len(multiprocessing.active_children()))
        return torch.nn.functional.normalize(pixels.flatten(1)[:, :4] + 1, dim=-1)


def test_no_more_workers_than_units(tmp_path):
    from eva_open_clip.embed.npy_job import embed_to_npy
    from eva_open_clip.runtime.encoder import Encoder
    model = _CountingWorkers()
    encoder = Encoder(model, model.preprocess, None, 'cpu', 'fp32')
    rows, skipped = embed_to_npy(lambda: encoder, [str(DATA / 'images' / 'palette_120.png')], tmp_path / 'one.npy',
                                 workers=8)
    assert (rows, skipped) == (1, []) and model.workers_seen == {1}  # one unit: one worker, not 8
    assert np.load(tmp_path / 'one.npy').shape == (1, 4)


def test_the_readme_model_table_is_the_registry():
    readme = (ROOT / 'README.md').read_text()
    table = readme[readme.index('## Models'):].split('\n\n')[1].splitlines()[2:]
    rows = [[cell.strip().strip('`') for cell in line.strip('|').split('|')] for line in table]
    assert rows == [[r.name, r.tag, r.hub_file, r.params, r.file_size] for r in BUILTIN_MODELS]
