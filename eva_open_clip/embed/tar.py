"""Reading a webdataset tar shard member by member, placing any damage exactly.

A shard is read with Python's `tarfile` in stream mode (as webdataset does), so that every member before
the damage is yielded and the damage is one `Skip` naming the member where the shard ends. Local files
and URLs (`http(s)://` and `pipe:`, opened by `remote`) alike, with one difference: the damage of a local
shard is its data (the unit is done with the samples before it), while a remote stream that is cut short,
damaged, not a tar at all (an error page) or without any member is a failed read (`ShardRead.failure`):
its unit is not done, and is tried again.
"""
from __future__ import annotations

import contextlib
import gzip
import re
import tarfile
import zlib
from dataclasses import dataclass
from typing import BinaryIO, Iterator

from webdataset.tariterators import base_plus_ext

from eva_open_clip.embed.remote import ReadFailed, RemoteOptions, RemoteStream, is_url, open_remote
from eva_open_clip.runtime.skips import UNREADABLE, Reason, Skip

MAX_MEMBER_BYTES = 1 << 30  # a larger member is not read: its sample is a `member_too_large` skip
TOO_LARGE = object()  # stands for the data of such a member
_WDS_META = re.compile(r'__[^/]*__($|/)')  # webdataset's members that belong to no sample


class _CountedStream:
    """A binary stream's bytes as read, counted, with the last 1024 kept (to find a tar's end marker)."""

    def __init__(self, raw: BinaryIO):
        # read1: what can be had now, so that a gzip stream cut short gives its bytes before the cut
        self.read_some, self.total, self.tail, self.head = getattr(raw, 'read1', raw.read), 0, b'', b''
        self.all_zero = True  # so far: an empty archive is nothing but zero blocks

    def read(self, size: int = -1) -> bytes:
        data = self.read_some(size)
        if len(self.head) < 40:  # for messages about what a stream holds instead of a tar
            self.head = (self.head + data)[:40]
        self.total += len(data)
        if self.all_zero and data.count(0) != len(data):
            self.all_zero = False
        self.tail = (self.tail + data)[-1024:]
        return data

    def ends_as_a_tar(self) -> bool:
        """Read to the end; whether the stream is whole 512-byte blocks ending in two zero blocks."""
        while self.read(1 << 20):
            pass
        return self.total >= 1024 and self.total % 512 == 0 and not any(self.tail)


_READ_ERRORS = (tarfile.TarError, EOFError, OSError, zlib.error)


@dataclass
class ShardRead:
    """What reading a shard gave beside its members: a remote shard's bytes and their SHA-256 (once read to its
    end), or why its read failed."""

    size: int | None = None
    sha256: str | None = None
    failure: ReadFailed | None = None

    def record(self) -> dict | None:
        """The unit record's account of a remote shard's bytes."""
        return None if self.sha256 is None else {'bytes': self.size, 'sha256': self.sha256}


@contextlib.contextmanager
def _open_shard(shard: str, remote: RemoteOptions) -> Iterator[BinaryIO]:
    """A local shard's file, or a URL's stream (`remote.open_remote`), closed on the way out."""
    raw = open(shard, 'rb') if not is_url(shard) else open_remote(shard, remote)
    try:
        yield raw
    finally:
        raw.close()


def tar_members(shard: str, remote: RemoteOptions = RemoteOptions(),
                read: ShardRead | None = None) -> Iterator[tuple[str, str, bytes] | Skip]:
    """(sample key, extension, data) of each member of a shard in order, then a `Skip` if it is damaged.

    A member cut short is not yielded: the Skip carries its sample's key, and that sample is lost. A
    shard that could not be opened or read to its end (a URL not found, a command that failed), and a
    remote one that is damaged or holds no member, ends with a Skip of reason UNREADABLE (`read.failure`
    says why): its unit is not done, and is tried again.
    """
    read = read if read is not None else ShardRead()
    damage = None
    try:
        with _open_shard(shard, remote) as raw:
            gzipped = re.search(r'\.(tar\.gz|tgz)\b', shard) if is_url(shard) else shard.endswith(('.gz', '.tgz'))
            stream = _CountedStream(gzip.GzipFile(fileobj=raw) if gzipped else raw)
            if isinstance(raw, RemoteStream):
                yield from _trusted(_members_of(stream), stream)
                read.size, read.sha256 = raw.size, raw.sha256
            else:
                for item in _members_of(stream):
                    if isinstance(item, Skip):
                        damage = item
                        break
                    yield item
    except ReadFailed as e:
        read.failure = e
        damage = Skip(None, UNREADABLE, f'could not be read ({e})')
    except OSError as e:
        damage = Skip(damage.key if damage else None, UNREADABLE, f'could not be read ({str(e)[:300]})')
    except Exception as e:  # whatever else a damaged archive makes tarfile raise: damage, not a stop
        damage = Skip(None, Reason.DAMAGED_TAR, f'unreadable ({type(e).__name__}: {str(e)[:200]})')
    if damage is not None:
        yield damage


def _trusted(members: Iterator, stream: _CountedStream) -> Iterator[tuple[str, str, bytes]]:
    """The members of a remote stream, read to its end; damage, or no member at all, is a failed read."""
    count = 0
    for item in members:
        if isinstance(item, Skip):
            raise ReadFailed(f'damaged or cut short ({item.detail})' if count else
                             f'not a tar archive: it begins with {stream.head!r}')
        count += 1
        yield item
    if not count:
        raise ReadFailed('it holds no tar member')


def _members_of(stream: _CountedStream) -> Iterator[tuple[str, str, bytes] | Skip]:
    last = None  # the last whole member
    try:
        archive = tarfile.open(fileobj=stream, mode='r|')
    except _READ_ERRORS as e:
        if not _empty_archive(stream):  # Python < 3.11 refuses an archive of end blocks only
            yield Skip(None, Reason.DAMAGED_TAR, f'not a readable tar ({type(e).__name__})')
        return
    while True:
        try:
            info = archive.next()
        except _READ_ERRORS as e:
            if last is not None or not _empty_archive(stream):
                yield Skip(None, Reason.DAMAGED_TAR, f'unreadable after member {last} ({type(e).__name__})')
            return
        if info is None:
            break
        key, extension = base_plus_ext(info.name)
        if not info.isreg() or key is None or _WDS_META.match(info.name):
            continue
        if info.size > MAX_MEMBER_BYTES:  # not read: the stream skips over it
            archive.members = []
            last = info.name
            yield key, extension.lower(), TOO_LARGE
            continue
        try:
            data = archive.extractfile(info).read()
        except _READ_ERRORS as e:
            yield Skip(key, Reason.DAMAGED_TAR, f'the shard ends inside member {info.name} ({type(e).__name__})')
            return
        archive.members = []  # a shard may hold millions of members: keep none
        last = info.name
        yield key, extension.lower(), data
    try:
        whole = stream.ends_as_a_tar()
    except _READ_ERRORS:
        whole = False
    if not whole:
        yield _cut_short(stream, archive.offset, last)


def _empty_archive(stream: _CountedStream) -> bool:
    """Whether the whole stream is a tar archive with no member: whole zero blocks, at least two."""
    try:
        return stream.ends_as_a_tar() and stream.all_zero
    except _READ_ERRORS:
        return False


def _cut_short(stream: _CountedStream, offset: int, last: str | None) -> Skip:
    """The damage of a shard that ends without an end marker, `offset` being where its next header starts.

    When the shard ends inside that header, the member it begins is named when its name was read (the
    first 100 bytes of a header), so that the sample it belongs to is known to be incomplete.
    """
    cut = stream.total - offset
    header = stream.tail[-cut:] if 0 < cut < 512 else b''
    name = header[:100].split(b'\0')[0].decode('utf-8', 'replace')
    if header and (b'\0' in header[:100] or len(header) >= 100):
        key = base_plus_ext(name)[0]
        return Skip(key, Reason.DAMAGED_TAR, f'the shard ends inside the header of member {name}')
    last_key = base_plus_ext(last)[0] if last else None
    # a name cut short: maybe the last sample's
    if header and last_key and ((last_key + '.').startswith(name) or name.startswith(last_key + '.')):
        return Skip(last_key, Reason.DAMAGED_TAR, f'the shard ends inside the header of a member after {last}')
    return Skip(None, Reason.DAMAGED_TAR, f'no end-of-archive marker after member {last} (cut short?)')
