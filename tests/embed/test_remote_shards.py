"""Remote shards at scale: transient failures are retried, a hung transfer neither outlives nor stalls the job, a
stream that is not a tar is never marked done, a lost shard is no dead end, presigned URLs resume; folder walks
and `--files-from` lists take every file they should.

Shards are served by a local HTTP server that misbehaves on purpose (`support.http`), and read by `pipe:`
commands that fail or hang; every command a test starts carries a marker, and no process with it may be left
once the job has ended.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import tarfile
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support.cli import error_line
from support.embed import add_member, embed_here, png, read_folder, run_embed, same_rows
from support.http import ShardServer

SHARDS = 3


def _marker() -> str:
    return f'eva-test-{uuid.uuid4().hex[:12]}'


def _left(marker: str) -> list[str]:
    """The command lines of processes still running that carry `marker`."""
    found = []
    for entry in Path('/proc').iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / 'cmdline').read_bytes().replace(b'\0', b' ').decode('utf-8', 'replace')
            except OSError:
                continue
            if marker in line and str(os.getpid()) != entry.name:
                found.append(line)
    return found


def _gone_within(marker: str, seconds: float) -> bool:
    deadline = time.time() + seconds
    while _left(marker) and time.time() < deadline:
        time.sleep(0.1)
    return not _left(marker)


@pytest.fixture(scope='module')
def shards(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp('served')
    for s in range(SHARDS):
        with tarfile.open(folder / f'r-{s}.tar', 'w') as tf:
            for i in range(6):
                add_member(tf, f'{s}{i:03d}.png', png(i, s + 10))
                add_member(tf, f'{s}{i:03d}.txt', f'remote {s} {i}'.encode())
    return folder


@pytest.fixture(scope='module')
def reference(tiny, shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp('reference') / 'out'
    assert embed_here(tiny, str(shards / f'r-{{0..{SHARDS - 1}}}.tar'), '--workers', '0', out=out).returncode == 0
    return out


@pytest.fixture()
def server(shards):
    with ShardServer(shards) as running:
        yield running


def test_transient_failures_are_retried(tiny, server, reference, tmp_path):
    """A 503 and a connection cut mid-shard, once each: retried (1 and 2 s apart), so the job is the clean one."""
    urls = [server.url('flaky', 'r-0.tar'), server.url('cut', 'r-1.tar'), server.url('ok', 'r-2.tar')]
    out = tmp_path / 'out'
    result = embed_here(tiny, *urls, '--workers', '1', out=out)
    assert result.returncode == 0, result.stderr[-3000:]
    same_rows(reference, out)
    assert server.requests['/flaky/r-0.tar'] == 2 and server.requests['/cut/r-1.tar'] == 2
    for n, url in enumerate(urls):  # each remote shard's bytes and their checksum, in its unit's record
        record = json.loads((out / 'shards' / f'{n:06d}.json').read_text())
        served = server.folder / f'r-{n}.tar'
        assert record['read'] == {'bytes': served.stat().st_size,
                                  'sha256': hashlib.sha256(served.read_bytes()).hexdigest()}


def test_what_is_not_a_tar_is_never_done_and_a_lost_shard_is_no_dead_end(tiny, server, reference, tmp_path):
    out = tmp_path / 'out'
    marker = _marker()
    urls = [server.url('ok', 'r-0.tar'), server.url('html', 'r-1.tar'), f'pipe:true # {marker}',
            f'pipe:echo "<html>error</html>" # {marker}', server.url('gone', 'r-2.tar')]
    result = embed_here(tiny, *urls, '--workers', '0', '--retries', '1', out=out)
    line = error_line(result, 1)
    assert line.startswith('eva-open-clip embed: 4 shards could not be read, e.g. ') and \
        line.endswith('(a shard lost for good: --give-up SHARD); they are not marked done: run the same command to '
                      'try them again')
    assert sorted(p.name for p in (out / 'shards').iterdir()) == ['000000.json']  # only the tar is done
    assert server.requests['/html/r-1.tar'] == 2 and server.requests['/gone/r-2.tar'] == 1  # a 404 is not retried
    # the shards that stay lost: left out of the inputs (never done, so nothing protects them) ...
    kept = embed_here(tiny, urls[0], server.url('ok', 'r-1.tar'), '--workers', '0', out=out)
    assert kept.returncode == 0, kept.stderr[-3000:]
    # ... or given up on for good, which the folder records
    again = embed_here(tiny, *urls[:2], server.url('ok', 'r-2.tar'), '--workers', '0', '--give-up', urls[1],
                       out=tmp_path / 'given')
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / 'given' / 'summary.json').read_text())
    assert summary['given_up'] == [urls[1]] and summary['rows'] == 12
    assert _gone_within(marker, 2)


def test_a_scheme_without_an_opener_is_a_usage_error(tiny, tmp_path):
    line = error_line(embed_here(tiny, 's3://bucket/x-0001.tar', out=tmp_path / 'out'), 2)
    assert line == ("eva-open-clip embed: s3://bucket/x-0001.tar: no opener for s3:// URLs (this tool reads http(s)"
                    ":// and pipe:); give it as 'pipe:aws s3 cp s3://bucket/x-0001.tar -'")
    assert not (tmp_path / 'out').exists()


@pytest.mark.parametrize('workers', ['0', '1'])
def test_a_stalled_read_fails_within_its_limit_and_leaves_no_process(tiny, server, shards, tmp_path, workers):
    marker = _marker()
    hang = f'pipe:head -c 2048 {shards / "r-0.tar"}; sleep 300 # {marker}'
    started = time.time()
    result = embed_here(tiny, hang, server.url('stall', 'r-1.tar'), server.url('ok', 'r-2.tar'),
                        '--workers', workers, '--stall-timeout', '2', '--retries', '0', out=tmp_path / 'out')
    line = error_line(result, 1)
    assert time.time() - started < 60
    assert line.startswith('eva-open-clip embed: 2 shards could not be read, e.g. ') and \
        'no byte came for 2 s (the stall limit)' in line
    assert sorted(read_folder(tmp_path / 'out')) == [f'2{i:03d}' for i in range(6)]
    assert _gone_within(marker, 2)


@pytest.mark.parametrize('workers', ['0', '1'])
def test_a_signal_stops_the_job_at_once_and_every_transfer_with_it(tiny, server, shards, tmp_path, workers):
    marker = _marker()
    hang = f'pipe:head -c 2048 {shards / "r-0.tar"}; sleep 300 # {marker}'
    job = run_embed(tiny, server.url('stall', 'r-1.tar'), hang, '--workers', workers, out=tmp_path / 'out',
                    background=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (server.requests['/stall/r-1.tar'] and _left(marker)):
        time.sleep(0.1)
    time.sleep(0.5)
    job.send_signal(signal.SIGTERM)
    try:
        _, stderr = job.communicate(timeout=15)  # the transfers hold no output of the job's open
    finally:
        job.kill()
    assert job.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert stderr.strip().splitlines()[-1].startswith('eva-open-clip embed: interrupted after 0 of 2 units')
    assert _gone_within(marker, 2)


def test_a_hung_command_dies_with_a_killed_job(tiny, shards, tmp_path):
    marker = _marker()
    hang = f'pipe:head -c 2048 {shards / "r-0.tar"}; sleep 300; sleep 300 # {marker}'
    for workers in ('0', '1'):
        job = run_embed(tiny, hang, '--workers', workers, out=tmp_path / f'out{workers}', background=True)
        deadline = time.time() + 120
        while time.time() < deadline and not _left(marker):
            time.sleep(0.1)
        time.sleep(0.5)
        job.send_signal(signal.SIGKILL)
        job.wait(timeout=30)
        job.stdout.close()
        job.stderr.close()
        assert _gone_within(marker, 2), _left(marker)


def test_one_file_output_names_each_unreadable_shard_and_writes_nothing(tiny, server, tmp_path):
    out = tmp_path / 'emb.npy'
    result = embed_here(tiny, server.url('ok', 'r-0.tar'), server.url('gone', 'r-1.tar'), '--workers', '0', out=out)
    line = error_line(result, 1)
    assert line == (f'eva-open-clip embed: 1 shard could not be read: {server.url("gone", "r-1.tar")} (could not be '
                    'read (the server answered HTTP 404 Not Found)); nothing was written: run it again, or leave a '
                    'shard out for good with --give-up SHARD')
    assert not out.exists()
    result = embed_here(tiny, server.url('ok', 'r-0.tar'), server.url('gone', 'r-1.tar'), '--workers', '0',
                        '--give-up', server.url('gone', 'r-1.tar'), out=out)
    assert result.returncode == 0 and len(np.load(out)) == 6


def test_presigned_urls_resume_with_new_signatures(tiny, server, reference, tmp_path):
    out = tmp_path / 'out'

    def signed(kind: str, n: int, signature: str) -> str:
        return server.url(kind, f'r-{n}.tar', f'X-Amz-Date=2026{signature}&X-Amz-Signature={signature}&part={n}')

    first = embed_here(tiny, signed('ok', 0, 'aaa'), signed('gone', 1, 'aaa'), signed('ok', 2, 'aaa'),
                       '--workers', '0', out=out)
    assert first.returncode == 1
    resumed = embed_here(tiny, signed('ok', 0, 'bbb'), signed('gone', 1, 'bbb'), signed('ok', 2, 'bbb'),
                         '--workers', '0', '--give-up', signed('gone', 1, 'ccc'), out=out)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert 'this run: 0 samples' in resumed.stderr  # nothing embedded twice, nothing refused
    other = error_line(embed_here(tiny, signed('ok', 0, 'bbb').replace('part=0', 'part=9'), '--workers', '0',
                                  out=out), 2)
    assert 'no longer among the inputs' in other  # a parameter that does not sign still counts


def test_folders_take_what_this_pillow_opens_and_count_the_rest(tiny, tmp_path):
    from eva_open_clip.embed.inputs import image_suffixes
    folder = tmp_path / 'photos'
    folder.mkdir()
    picture = Image.fromarray(np.full((40, 50, 3), 120, dtype=np.uint8))
    picture.save(folder / 'a.jfif', 'JPEG')
    if '.avif' in image_suffixes():
        picture.save(folder / 'b.avif', 'AVIF')
    (folder / 'c.heic').write_bytes(b'not decodable here')
    (folder / 'notes.txt').write_text('not a picture')
    result = embed_here(tiny, folder, '--workers', '0', out=tmp_path / 'out.npy')
    assert result.returncode == 0, result.stderr[-2000:]
    taken = (tmp_path / 'out.paths.txt').read_text().splitlines()
    assert taken == [str(folder / 'a.jfif')] + ([str(folder / 'b.avif')] if '.avif' in image_suffixes() else [])
    heic = '.heic 1, ' if '.heic' not in image_suffixes() else ''
    assert (f'note: passed over {2 if heic else 1} file(s) in the input folders that are neither images this '
            f'Pillow opens nor shards ({heic}.txt 1)') in result.stderr


def test_files_from_takes_a_nul_separated_list_byte_for_byte(tiny, tmp_path):
    names = ['plain.png', 'with\nnewline.png', ' leading space.png', 'trailing\r.png']
    for i, name in enumerate(names):
        (tmp_path / name).write_bytes(png(i, 5))
    listing = tmp_path / 'list0'
    listing.write_bytes(b''.join(os.fsencode(tmp_path / n) + b'\0' for n in names))  # find -print0
    out = tmp_path / 'out.npy'
    result = embed_here(tiny, '--files-from', listing, '--workers', '0', out=out)
    assert result.returncode == 0, result.stderr[-2000:]
    from eva_open_clip.embed.store.names import original_name
    lines = (tmp_path / 'out.paths.txt').read_text(encoding='utf-8').splitlines()
    assert [os.fsdecode(original_name(line)) for line in lines] == [str(tmp_path / n) for n in names]
    assert len(np.load(out)) == 4
