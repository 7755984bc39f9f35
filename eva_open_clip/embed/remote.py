"""Reading remote shards: `http(s)://` URLs in this process (urllib), `pipe:COMMAND` through a command that ends
with the job.

Whatever the installed webdataset does, this tool decides how a remote read behaves:

- a stall limit on every read (`stall_timeout`: no byte for that long is a failed read), in the decoding
  workers and in the main process alike;
- a `pipe:` command runs in a process group of its own, killed with everything it started as soon as the read
  ends early, stalls or is interrupted, and when the process reading it dies, even by SIGKILL (the parent-death
  signal on Linux, which the command's shell turns into a SIGKILL of its group); reading never waits for it;
- a failure says whether another try may help (`ReadFailed.transient`): connection errors, time-outs, HTTP
  408/425/429/5xx and commands that fail may; HTTP 4xx otherwise, and a command that cannot run, do not;
- `url_identity` ignores the query parameters that sign or date a URL (S3, GCS, Azure, CloudFront), so that a
  job over presigned URLs resumes with freshly signed ones.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import http.client
import io
import os
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from eva_open_clip.errors import UsageError

SCHEMES = ('http', 'https')  # and `pipe:`
# how to read what no opener here reads: a command that writes the object to standard output
PIPE_FORMS = {'s3': 'pipe:aws s3 cp {url} -', 'gs': 'pipe:gcloud storage cat {url}'}
SIGNATURE_PARAMS = frozenset(p.lower() for p in (
    # S3 (SigV4 and SigV2)
    'X-Amz-Algorithm', 'X-Amz-Credential', 'X-Amz-Date', 'X-Amz-Expires', 'X-Amz-SignedHeaders',
    'X-Amz-Signature', 'X-Amz-Security-Token', 'AWSAccessKeyId', 'Signature', 'Expires',
    # Google Cloud Storage (V4 and V2)
    'X-Goog-Algorithm', 'X-Goog-Credential', 'X-Goog-Date', 'X-Goog-Expires', 'X-Goog-SignedHeaders',
    'X-Goog-Signature', 'GoogleAccessId',
    # Azure shared access signatures
    'sv', 'ss', 'srt', 'sp', 'se', 'st', 'spr', 'sig', 'sr', 'si', 'sdd', 'skoid', 'sktid', 'skt', 'ske', 'sks',
    'skv', 'saoid', 'suoid', 'scid', 'ses',
    # CloudFront signed URLs
    'Policy', 'Key-Pair-Id'))
TRANSIENT_HTTP = frozenset({408, 425, 429, 500, 502, 503, 504})
_CANNOT_RUN = (126, 127)  # a shell's statuses for a command that is not executable or not found
_URL_IN_COMMAND = re.compile(r'https?://[^\s\'"]+')
# the shell around a pipe: command: a SIGTERM (the parent-death signal) kills the command's whole group
_SHELL = 'trap "kill -KILL 0" TERM HUP INT; sh -c "$1" & wait $!'


def is_url(path: str) -> bool:
    """A URL rather than a path: `pipe:COMMAND`, `http(s)://...`, or any other `SCHEME://` (refused by `check_url`)."""
    return path.startswith('pipe:') or '://' in path


def is_pipe(url: str) -> bool:
    return url.startswith('pipe:')


def check_url(url: str) -> None:
    """Refuse a URL that no opener here reads, naming the `pipe:` form that reads it."""
    if is_pipe(url):
        if not url[len('pipe:'):].strip():
            raise UsageError(f'{url}: a pipe: input names a command that writes the shard to standard output')
        return
    scheme, _, rest = url.partition('://')
    if scheme.lower() in SCHEMES:
        return
    form = PIPE_FORMS.get(scheme.lower())
    hint = (f"give it as '{form.format(url=url)}'" if form else f'give the path {rest}' if scheme == 'file'
            else 'give it as pipe:COMMAND, a command that writes it to standard output')
    raise UsageError(f'{url}: no opener for {scheme}:// URLs (this tool reads http(s):// and pipe:); {hint}')


def _canonical_url(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if not parts.query:
        return url
    kept = [(k, v) for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
            if k.lower() not in SIGNATURE_PARAMS]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(kept)))


def url_identity(url: str) -> str:
    """What a URL names, for resuming: the URL less the query parameters that sign or date it (in a `pipe:`
    command, of every http(s) URL in it); anything else in it counts."""
    if is_pipe(url):
        return _URL_IN_COMMAND.sub(lambda m: _canonical_url(m.group(0)), url)
    return _canonical_url(url)


@dataclass(frozen=True)
class RemoteOptions:
    """How remote shards are read: the stall limit of every read, and the tries after a transient failure."""

    stall_timeout: float = 1800.0
    retries: int = 5

    @staticmethod
    def backoff(attempt: int) -> float:
        """Seconds before try `attempt + 2`: 1, 2, 4, 8, 16, ... up to a minute."""
        return float(min(60, 2 ** attempt))

    def quiet_s(self) -> float:
        """The longest a decoding worker reading remote shards may go without handing over a batch: a stalled
        read, then the wait before the next try (a decoding worker silent for longer is stuck)."""
        return self.stall_timeout + self.backoff(self.retries) + 60


class ReadFailed(Exception):
    """A remote read that failed; `transient` when another try may succeed. (Not an OSError: the tar reader
    takes those for damage in the data.)"""

    def __init__(self, detail: str, transient: bool = True):
        super().__init__(detail)
        self.transient = transient


class RemoteStream(io.RawIOBase):
    """A remote shard's bytes, counted and hashed (SHA-256) as they are read (`size`, `sha256`)."""

    def __init__(self, url: str, options: RemoteOptions):
        super().__init__()
        self.url, self.options = url, options
        self.size, self.hash, self.finished = 0, hashlib.sha256(), False

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._read_into(buffer)
        if count:
            self.size += count
            self.hash.update(memoryview(buffer)[:count])
        else:
            self._at_end()
            self.finished = True
        return count

    @property
    def sha256(self) -> str:
        return self.hash.hexdigest()

    def _read_into(self, buffer) -> int:
        raise NotImplementedError

    def _at_end(self) -> None:
        """Raise `ReadFailed` if the transfer did not end well."""


class _HttpStream(RemoteStream):
    def __init__(self, url: str, options: RemoteOptions):
        super().__init__(url, options)
        request = urllib.request.Request(url, headers={'User-Agent': 'eva-open-clip'})
        try:
            self.response = urllib.request.urlopen(request, timeout=options.stall_timeout)
        except urllib.error.HTTPError as e:
            raise ReadFailed(f'the server answered HTTP {e.code} {e.reason}', e.code in TRANSIENT_HTTP) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            raise ReadFailed(_transport_error(e, options)) from None

    def _read_into(self, buffer) -> int:
        try:
            return self.response.readinto(buffer)
        except (OSError, http.client.HTTPException) as e:
            raise ReadFailed(_transport_error(e, self.options)) from None

    def close(self) -> None:
        if not self.closed:
            self.response.close()
        super().close()


def _transport_error(error: BaseException, options: RemoteOptions) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)) or isinstance(getattr(error, 'reason', None), TimeoutError):
        return f'no byte came for {options.stall_timeout:g} s (the stall limit)'
    if isinstance(error, http.client.IncompleteRead):
        return f'the connection ended after {len(error.partial)} bytes, before the end of the shard'
    reason = getattr(error, 'reason', None) or error
    return f'{type(error).__name__}: {str(reason)[:200]}'


_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True) if sys.platform.startswith('linux') else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the command's shell, before it starts: SIGTERM when the process that reads it dies (Linux)."""
    if _libc is not None:
        _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _PipeStream(RemoteStream):
    def __init__(self, url: str, options: RemoteOptions):
        super().__init__(url, options)
        self.errors = tempfile.TemporaryFile()
        self.process = subprocess.Popen(['/bin/sh', '-c', _SHELL, 'sh', url[len('pipe:'):]],
                                        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.errors,
                                        start_new_session=True, preexec_fn=_die_with_parent)
        self.fd = self.process.stdout.fileno()

    def _read_into(self, buffer) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.options.stall_timeout)
        if not ready:
            self._kill()
            raise ReadFailed(f'no byte came for {self.options.stall_timeout:g} s (the stall limit)')
        data = os.read(self.fd, len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)

    def _at_end(self) -> None:
        try:
            status = self.process.wait(timeout=self.options.stall_timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise ReadFailed('the command closed its output but did not end') from None
        if status:
            self.errors.seek(0)
            said = self.errors.read().decode('utf-8', 'replace').strip().splitlines()
            detail = f'the command exited with status {status}' + (f': {said[-1][:200]}' if said else '')
            raise ReadFailed(detail, transient=status not in _CANNOT_RUN)

    def _kill(self) -> None:
        """End the command and everything it started, at once (a SIGKILL of its process group)."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()

    def close(self) -> None:
        if not self.closed:
            self._kill()
            self.process.stdout.close()
            self.errors.close()
        super().close()


def open_remote(url: str, options: RemoteOptions) -> RemoteStream:
    """A remote shard's stream (raises `ReadFailed`)."""
    return _PipeStream(url, options) if is_pipe(url) else _HttpStream(url, options)
