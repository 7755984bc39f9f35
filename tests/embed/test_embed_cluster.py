"""`embed --out DIR` as cluster jobs run it: preemption signals, killed jobs leaving no process behind, torchrun
ranks that finish far apart or have nothing to do, device per rank, progress in job logs, exit statuses.

Everything runs through the command line on the tiny model; resumed folders are compared with an
uninterrupted run.
"""
from __future__ import annotations

import io
import json
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
from PIL import Image

from support.cli import COMMANDS, TORCHRUN, run_cli
from support.embed import add_member, embed_command, png, read_folder, run_embed, same_output, same_rows


def _shards(root: Path, sizes: list[int], slow: tuple[int, ...] = ()) -> str:
    """Shards of `sizes` PNGs; those of the shards in `slow` are 4000x4000 (about 0.25 s each to decode)."""
    root.mkdir(parents=True, exist_ok=True)
    for s, size in enumerate(sizes):
        with tarfile.open(root / f'c-{s}.tar', 'w') as tf:
            for i in range(size):
                add_member(tf, f'{s}{i:05d}.png', _big_png(i) if s in slow else png(i, s))
    return str(root / f'c-{{0..{len(sizes) - 1}}}.tar')


def _big_png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.new('RGB', (4000, 4000), (i % 256, 200, 30)).save(buf, 'PNG')
    return buf.getvalue()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / 'stat').read_bytes().rsplit(b')', 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _running(pids: set[int]) -> set[int]:
    alive = set()
    for pid in pids:
        try:
            state = Path(f'/proc/{pid}/stat').read_bytes().rsplit(b')', 1)[1].split()[0]
        except OSError:
            continue
        if state not in (b'Z', b'X'):
            alive.add(pid)
    return alive


def _interrupt(tiny, args, out: Path, signum: int) -> tuple[subprocess.Popen, str, set[int]]:
    """Start a job, send `signum` to its main process once a unit is done; (process, stderr, its processes)."""
    job = run_embed(tiny, *args, out=out, background=True)
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None and not list((out / 'shards').glob('*.json')):
        time.sleep(0.05)
    processes = _descendants(job.pid)
    assert job.poll() is None and processes, 'the job ended before it could be interrupted'
    job.send_signal(signum)
    _, stderr = job.communicate(timeout=60)  # nothing of the job keeps its output pipes open
    return job, stderr, processes


@pytest.fixture(scope='module')
def uninterrupted(tiny, tmp_path_factory) -> tuple[tuple[str, ...], Path]:
    """The arguments of a job over four shards of 150 samples, and the folder it writes uninterrupted."""
    root = tmp_path_factory.mktemp('uninterrupted')
    args = (_shards(root / 'shards', [150, 150, 150, 150]), '--batch-size', '1', '--part-size', '40', '--workers', '2')
    assert run_embed(tiny, *args, out=root / 'reference').returncode == 0
    return args, root / 'reference'


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_interrupted_job_leaves_no_process_and_resumes_exactly(signum, tiny, uninterrupted, tmp_path):
    args, reference = uninterrupted
    out = tmp_path / 'out'
    job, stderr, processes = _interrupt(tiny, args, out, signum)
    if signum == signal.SIGKILL:
        assert job.returncode == -signal.SIGKILL
    else:
        assert job.returncode == 128 + signum, stderr[-3000:]
        assert 'Traceback' not in stderr
        done = len(list((out / 'shards').glob('*.json')))
        assert stderr.strip().splitlines()[-1] == \
            f'eva-open-clip embed: interrupted after {done} of 4 units; run the same command to resume'
    deadline = time.time() + 10
    while _running(processes) and time.time() < deadline:
        time.sleep(0.2)
    assert not _running(processes), 'processes of the job outlived it'
    result = run_embed(tiny, *args, out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    same_output(reference, out)


def test_ranks_finishing_far_apart_wait_on_no_collective(tiny, tmp_path):
    # unit 1 (rank 1's) is slow to decode; rank 0's units 0 and 2 are quick: rank 0 ends long before rank 1
    pattern = _shards(tmp_path / 'shards', [4, 30, 4], slow=(1,))
    out = tmp_path / 'out'
    result = run_cli(*embed_command(tiny, pattern, '--batch-size', '1', '--workers', '1', out=out), launcher=TORCHRUN,
                     env={'EVA_OPEN_CLIP_START_TIMEOUT_S': '3'})  # every collective would time out after 3 s
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    rank0, rank1 = summary['ranks']
    assert (rank0['units'], rank1['units']) == (2, 1) and summary['rows'] == 38
    assert rank1['seconds'] - rank0['seconds'] > 3  # rank 0 waited for rank 1 longer than the timeout
    assert not list((out / 'ranks').iterdir())
    assert len(read_folder(out)) == 38


def test_a_rank_without_units_does_not_load_the_model(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [5])
    out = tmp_path / 'out'
    result = run_embed(tiny, pattern, out=out, launcher=TORCHRUN)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((out / 'summary.json').read_text())
    assert [(r['rank'], r['units'], r['model_loaded']) for r in summary['ranks']] == [(0, 1, True), (1, 0, False)]
    assert summary['rows'] == 5


def test_one_gpu_named_for_every_rank_is_a_usage_error(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [2])
    result = run_embed(tiny, pattern, '--device', 'cuda:1', out=tmp_path / 'out', launcher=TORCHRUN)
    assert result.returncode != 0
    assert ('eva-open-clip embed: --device cuda:1 would put all 2 ranks of this node on one GPU: give --device cuda '
            '(each rank takes cuda:LOCAL_RANK)') in result.stderr
    assert 'eva_open_clip/' not in result.stderr  # no traceback of ours (torchrun prints its own summary)


def test_npy_output_under_torchrun_is_refused(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [2])
    result = run_embed(tiny, pattern, out=tmp_path / 'x.npy', launcher=TORCHRUN)
    assert result.returncode != 0
    assert ('eva-open-clip embed: --out FILE.npy is written by one process: under torchrun give --out DIR'
            in result.stderr)


def test_progress_in_a_job_log_is_plain_lines(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [100, 100, 100])
    result = run_embed(tiny, pattern, '--batch-size', '1', '--workers', '1', '--progress-interval', '0.3',
                       out=tmp_path / 'out')
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith('progress: ')]
    assert lines and '\r' not in result.stderr
    assert all(' units done, ' in line and line.split()[1].endswith('/3') for line in lines)
    assert any('left' in line for line in lines) or len(lines) == 1
    quiet = run_embed(tiny, pattern, '--quiet', out=tmp_path / 'quiet')
    assert quiet.returncode == 0 and '\r' not in quiet.stderr and 'progress: ' not in quiet.stderr
    assert quiet.stderr.strip().splitlines()[-1].startswith('embedded 300 samples of 3 units')


def test_nothing_embedded_is_a_failure_with_the_reasons(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [3])
    result = run_embed(tiny, pattern, '--image-key', 'jpg', out=tmp_path / 'out')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == ("eva-open-clip embed: no sample could be embedded (3 skipped: "
                                                      "no_image 3; check --image-key and --caption-key)")


@pytest.fixture
def http_server(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/served (stopped after the test)."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    served = tmp_path / 'served'
    served.mkdir()
    server = ThreadingHTTPServer(('127.0.0.1', 0), functools.partial(Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    thread.join()


def test_remote_shards_through_webdataset_urls(tiny, tmp_path, http_server):
    import gzip
    import shutil
    served, base = http_server
    local = _shards(tmp_path / 'shards', [20, 20, 20])
    reference = run_embed(tiny, local, out=tmp_path / 'reference')
    assert reference.returncode == 0, reference.stderr[-3000:]
    for s in range(3):
        shutil.copy(tmp_path / 'shards' / f'c-{s}.tar', served / f'c-{s}.tar')
    (served / 'c-2.tgz').write_bytes(gzip.compress((served / 'c-2.tar').read_bytes()))
    inputs = {  # the arguments, and the units they are listed as (a remote shard is known by its URL)
        'http': ([f'{base}/c-{{0..1}}.tar', f'{base}/c-2.tgz'],
                 [f'{base}/c-0.tar', f'{base}/c-1.tar', f'{base}/c-2.tgz']),
        'pipe': ([f'pipe:cat {tmp_path}/shards/c-{{0..2}}.tar'],
                 [f'pipe:cat {tmp_path}/shards/c-{s}.tar' for s in range(3)]),
    }
    for name, (urls, listed) in inputs.items():
        out = tmp_path / name
        result = run_embed(tiny, *urls, out=out)
        assert result.returncode == 0, result.stderr[-3000:]
        same_rows(out, tmp_path / 'reference')
        units = [json.loads(line)['sources'] for line in (out / 'units.jsonl').read_text().splitlines()]
        assert units == [[{'path': url, 'real': url}] for url in listed]  # a URL is known by its text


def test_an_unreadable_remote_shard_is_retried_by_the_next_run(tiny, tmp_path, http_server):
    import shutil
    served, base = http_server
    _shards(tmp_path / 'shards', [10, 10])
    shutil.copy(tmp_path / 'shards' / 'c-0.tar', served / 'c-0.tar')  # c-1.tar is not there yet
    out = tmp_path / 'out'
    result = run_embed(tiny, f'{base}/c-{{0..1}}.tar', out=out)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(f'eva-open-clip embed: 1 shard could not be read, e.g. {base}/c-1.tar: could not be read')
    assert line.endswith('they are not marked done: run the same command to try them again')
    assert [p.name for p in (out / 'shards').iterdir()] == ['000000.json']
    shutil.copy(tmp_path / 'shards' / 'c-1.tar', served / 'c-1.tar')
    result = run_embed(tiny, f'{base}/c-{{0..1}}.tar', out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'this run: 10 samples' in result.stderr
    assert sorted(read_folder(out)) == sorted(f'{s}{i:05d}' for s in range(2) for i in range(10))


def _with_small_shm(size: str, cmd: list[str]) -> subprocess.CompletedProcess:
    """`cmd` in a mount namespace whose /dev/shm is a tmpfs of `size` (skips where that is not allowed)."""
    probe = subprocess.run(['unshare', '-m', 'sh', '-c', 'mount -t tmpfs -o size=1m tmpfs /dev/shm'],
                           capture_output=True)
    if probe.returncode:
        pytest.skip('making a mount namespace needs root and unshare')
    script = f'mount -t tmpfs -o size={size} tmpfs /dev/shm && exec "$@"'
    return subprocess.run(['unshare', '-m', 'sh', '-c', script, 'sh', *cmd], capture_output=True, text=True,
                          timeout=600)


def test_small_shared_memory_lowers_the_prefetch_or_says_what_to_do(tiny, tmp_path):
    pattern = _shards(tmp_path / 'shards', [40, 40])
    reference = run_embed(tiny, pattern, '--workers', '2', out=tmp_path / 'reference')
    assert reference.returncode == 0, reference.stderr[-3000:]
    cli = COMMANDS['module']
    # the tiny model's batches of 64 uint8 pictures: 0.57 MiB each, counted twice while handed over; 6 MiB holds 2
    # per worker for 2 workers, not 4
    result = _with_small_shm('6m', [*cli, *embed_command(tiny, pattern, '--workers', '2', '--batch-size', '64',
                                               out=tmp_path / 'out')])
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'note: /dev/shm has 6 MB free: each decoding worker keeps 2 batch(es) ready instead of 4' in result.stderr
    same_rows(tmp_path / 'reference', tmp_path / 'out')
    # batches of 256 (2.3 MiB): not one fits
    result = _with_small_shm('8m', [*cli, *embed_command(tiny, pattern, '--workers', '2', '--batch-size', '256',
                                                out=tmp_path / 'big')])
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        'eva-open-clip embed: /dev/shm has 8 MB free, too little for 2 decoding worker(s) handing over batches of '
        '2 MB: give the container more shared memory (e.g. docker run --shm-size 8g), or lower --batch-size or '
        '--workers (--workers 0 decodes in this process)')
