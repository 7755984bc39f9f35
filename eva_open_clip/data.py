"""Reading what `embed` embeds: image files, folders, file lists and webdataset tar shards.

`input_sources` lists the inputs in the order given (folders walked in path order, `--files-from`
read line by line), each with the identity that shows a later change: size and modification time of
a tar shard, size of an image file. A missing input is an `InputError` here, before any work.

`unit_samples` reads the samples of one unit of work (see `units.py`). A sample that cannot be used
(no image, bad json, ...; see `Skip`) is reported with its key and a reason code, never raised. A tar
shard is read member by member with Python's `tarfile` (as webdataset does, with webdataset's rule
for grouping members into samples), so that damage is placed exactly: every sample whose members all
precede the damage is kept, and the damage is one `Skip` naming the member where the shard ends.
"""
from __future__ import annotations

import contextlib
import glob
import gzip
import io
import json
import os
import re
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator, Sequence

from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from .errors import UsageError

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}
SHARD_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')
CAPTION_KEY = 'txt'
_PATTERN_CHARS = set('{*?[')
UNREADABLE = 'unreadable_shard'
_WDS_META = re.compile(r'__[^/]*__($|/)')  # webdataset's members that belong to no sample


class InputError(UsageError):
    """An input argument that names nothing readable."""


@dataclass(frozen=True)
class Source:
    """An input and what shows that it changed: a file's size, and a local shard's modification time.

    A remote shard (a webdataset URL such as `https://host/0001.tar` or `pipe:aws s3 cp s3://b/0001.tar -`)
    is known by its URL alone.
    """

    path: str
    size: int | None = None
    mtime_ns: int | None = None

    @property
    def is_shard(self) -> bool:
        return is_shard(self.path)

    def identity(self) -> list:
        return [self.path] + [v for v in (self.size, self.mtime_ns) if v is not None]

    @staticmethod
    def from_identity(identity: list) -> 'Source':
        return Source(*identity)


def is_url(path: str) -> bool:
    """A webdataset URL, read through webdataset's opener (`pipe:COMMAND`, `http(s)://`, ...)."""
    return path.startswith('pipe:') or '://' in path


def is_shard(path: str) -> bool:
    return is_url(path) or path.endswith(SHARD_SUFFIXES)


def _source(path: str, stat: os.stat_result) -> Source:
    return Source(path, stat.st_size, stat.st_mtime_ns if is_shard(path) else None)


def _walk(folder: str) -> Iterator[Source]:
    """Image files under `folder`, in the order of their full path strings."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            is_dir = entry.is_dir()
            entries.append((entry.name + ('/' if is_dir else ''), entry, is_dir))
    for _, entry, is_dir in sorted(entries, key=lambda e: e[0]):
        if is_dir:
            yield from _walk(entry.path)
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES:
            yield _source(entry.path, entry.stat())


def expand_pattern(pattern: str) -> list[str]:
    """Paths a brace pattern (`data/{00000..00099}.tar`) and/or glob names, in the pattern's order."""
    found: list[str] = []
    for expanded in braceexpand(pattern):
        found.extend(sorted(glob.glob(expanded)) if set(expanded) & set('*?[') else [expanded])
    return found


def _stat(path: str, named_by: str) -> Source:
    try:
        return _source(path, os.stat(path))
    except FileNotFoundError:
        raise InputError(f'{path}: no such file{named_by}') from None
    except OSError as e:
        raise InputError(f'{path}: {e.strerror}{named_by}') from None


def input_sources(inputs: Sequence[str], files_from: str | None) -> Iterator[Source]:
    """Every input file (tar shards and image files), in the order given; raises InputError for a missing one."""
    for arg in inputs:
        if is_url(arg):
            yield from (Source(url) for url in braceexpand(arg))
        elif os.path.isdir(arg):
            yield from _walk(arg)
        elif os.path.isfile(arg):
            yield _stat(arg, '')
        elif set(arg) & _PATTERN_CHARS:
            matches = expand_pattern(arg)
            if not matches:
                raise InputError(f'{arg}: matches no file')
            yield from (_stat(m, f' (from {arg})') for m in matches)
        else:
            raise InputError(f'{arg}: no such file or folder')
    if files_from:
        try:
            with open(files_from, encoding='utf-8') as lines:
                for number, line in enumerate(lines, 1):
                    if line.strip():
                        yield _stat(line.rstrip('\n'), f' (line {number} of --files-from {files_from})')
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f'--files-from {files_from}: {getattr(e, "strerror", None) or e}') from None


@dataclass
class Sample:
    key: str  # the file's path, or the webdataset __key__
    image: Any  # a path or the image file's bytes
    caption: Any = None  # bytes or str, when captions are read
    meta: dict | None = None


@dataclass(frozen=True)
class Skip:
    """A sample that gives no row: its key (None when unknown), a reason code and a detail for people.

    Codes: `no_image`, `bad_json`, `no_caption`, `caption_not_text`, `undecodable_image`, `damaged_tar`,
    and UNREADABLE (`unreadable_shard`: the shard itself could not be read; its unit is not marked done).
    """

    key: str | None
    reason: str
    detail: str = ''


class _CountedStream:
    """A binary stream's bytes as read, counted, with the last 1024 kept (to find a tar's end marker)."""

    def __init__(self, raw: BinaryIO):
        # read1: what can be had now, so that a gzip stream cut short gives its bytes before the cut
        self.read_some, self.total, self.tail = getattr(raw, 'read1', raw.read), 0, b''
        self.all_zero = True  # so far: an empty archive is nothing but zero blocks

    def read(self, size: int = -1) -> bytes:
        data = self.read_some(size)
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


@contextlib.contextmanager
def _open_shard(shard: str) -> Iterator[BinaryIO]:
    """A local shard's file, or a URL's stream through webdataset's opener (a failed command: OSError on close)."""
    if not is_url(shard):
        with open(shard, 'rb') as f:
            yield f
        return
    from webdataset.gopen import gopen
    stream = gopen(shard, 'rb')
    try:
        yield stream
    finally:
        stream.close()


def _tar_members(shard: str) -> Iterator[tuple[str, str, bytes] | Skip]:
    """(sample key, extension, data) of each member of a shard in order, then a `Skip` if it is damaged.

    A member cut short is not yielded: the Skip carries its sample's key, and that sample is lost. A
    shard that could not be opened or read to its end (a URL not found, a command that failed) ends
    with a Skip of reason UNREADABLE: its unit is not done, and is tried again by the next run.
    """
    damage = None
    try:
        with _open_shard(shard) as raw:
            for item in _members_of(shard, raw):
                if isinstance(item, Skip):
                    damage = item
                    break
                yield item
    except OSError as e:
        damage = Skip(damage.key if damage else None, UNREADABLE, f'could not be read ({str(e)[:300]})')
    if damage is not None:
        yield damage


def _members_of(shard: str, raw: BinaryIO) -> Iterator[tuple[str, str, bytes] | Skip]:
    gzipped = re.search(r'\.(tar\.gz|tgz)\b', shard) if is_url(shard) else shard.endswith(('.gz', '.tgz'))
    stream = _CountedStream(gzip.GzipFile(fileobj=raw) if gzipped else raw)
    last = None  # the last whole member
    try:
        archive = tarfile.open(fileobj=stream, mode='r|')
    except _READ_ERRORS as e:
        if not _empty_archive(stream):  # Python < 3.11 refuses an archive of end blocks only
            yield Skip(None, 'damaged_tar', f'not a readable tar ({type(e).__name__})')
        return
    while True:
        try:
            info = archive.next()
        except _READ_ERRORS as e:
            if last is not None or not _empty_archive(stream):
                yield Skip(None, 'damaged_tar', f'unreadable after member {last} ({type(e).__name__})')
            return
        if info is None:
            break
        key, extension = base_plus_ext(info.name)
        if not info.isreg() or key is None or _WDS_META.match(info.name):
            continue
        try:
            data = archive.extractfile(info).read()
        except _READ_ERRORS as e:
            yield Skip(key, 'damaged_tar', f'the shard ends inside member {info.name} ({type(e).__name__})')
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
        return Skip(key, 'damaged_tar', f'the shard ends inside the header of member {name}')
    last_key = base_plus_ext(last)[0] if last else None
    if header and last_key and ((last_key + '.').startswith(name) or name.startswith(last_key + '.')):  # a name cut short: maybe the last sample's
        return Skip(last_key, 'damaged_tar', f'the shard ends inside the header of a member after {last}')
    return Skip(None, 'damaged_tar', f'no end-of-archive marker after member {last} (cut short?)')


def _tar_samples(shard: str, image_keys: Sequence[str], caption_key: str | None) -> Iterator[Sample | Skip]:
    """The samples of a shard: consecutive members with one key (webdataset's rule), in order."""
    members: dict[str, Any] = {}
    for item in _tar_members(shard):
        if isinstance(item, Skip):
            if item.key is not None and members.get('__key__') == item.key:
                members = {}  # the sample the damage cut into
            break
        key, extension, data = item
        if members and members['__key__'] != key:
            yield _sample(members, image_keys, caption_key)
            members = {}
        members.setdefault('__key__', key)
        members.setdefault(extension, data)
    else:
        item = None
    if members:
        yield _sample(members, image_keys, caption_key)
    if item is not None:
        yield item


def _sample(raw: dict[str, Any], image_keys: Sequence[str], caption_key: str | None) -> Sample | Skip:
    key = raw['__key__']
    image = next((raw[k] for k in image_keys if k in raw), None)
    if image is None:
        return Skip(key, 'no_image', 'no ' + '/'.join(image_keys) + ' member')
    meta = None
    if 'json' in raw:
        try:
            meta = json.loads(raw['json'])
        except ValueError as e:
            return Skip(key, 'bad_json', str(e)[:80])
        if not isinstance(meta, dict):
            return Skip(key, 'bad_json', 'not a JSON object')
    return Sample(key, image, raw.get(caption_key) if caption_key else None, meta)


def unit_samples(shard: str | None, files: Sequence[str], image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None) -> Iterator[Sample | Skip]:
    """The samples of a shard, or of image files (which have no captions), in order."""
    if shard is None:
        yield from (Sample(path, path) for path in files)
    else:
        yield from _tar_samples(shard, image_keys, caption_key)


def open_image(source: Any) -> Image.Image:
    """The decoded image of a path or of an image file's bytes (raises on failure)."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
        image.load()
        return image.copy()


def caption_text(caption: Any) -> str | Skip:
    """The caption as text, or the reason it is not usable."""
    if caption is None:
        return Skip(None, 'no_caption')
    if isinstance(caption, bytes):
        try:
            caption = caption.decode('utf-8')
        except UnicodeDecodeError:
            return Skip(None, 'caption_not_text', 'not UTF-8')
    return caption.strip()
