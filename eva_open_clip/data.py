"""Reading what `embed` embeds: image files, folders, file lists and webdataset tar shards.

`input_sources` lists the inputs in the order given (folders walked in path order for image files and
shards, `--files-from` read line by line), each with its resolved path and the identity that shows a
later change: size and modification time of a tar shard, size of an image file. A missing input, or a
problem inside an input folder, is an `InputError` naming it, before any work. `unique_sources` keeps
each file (by resolved path) or URL once.

`unit_samples` reads the samples of one unit of work (see `units.py`). A sample that cannot be used
(no image, bad json, ...; see `Skip`) is reported with its key and a reason code, never raised. A tar
shard is read member by member with Python's `tarfile` (as webdataset does, with webdataset's rule
for grouping members into samples), so that damage is placed exactly: every sample whose members all
precede the damage is kept, and the damage is one `Skip` naming the member where the shard ends.
"""
from __future__ import annotations

import contextlib
import errno
import glob
import gzip
import io
import json
import os
import re
import tarfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

import numpy as np
from braceexpand import braceexpand
from PIL import Image
from webdataset.tariterators import base_plus_ext

from . import metadata
from .embed_defaults import IMAGE_KEYS, MAX_IMAGE_PIXELS, MAX_RESIZED_PIXELS
from .errors import UsageError

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}
SHARD_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
_PATTERN_CHARS = set('{*?[')
UNREADABLE = 'unreadable_shard'
MAX_MEMBER_BYTES = 1 << 30  # a larger member is not read: its sample is a `member_too_large` skip
TOO_LARGE = object()  # stands for the data of such a member
_WDS_META = re.compile(r'__[^/]*__($|/)')  # webdataset's members that belong to no sample


class InputError(UsageError):
    """An input argument that names nothing readable."""


@dataclass(frozen=True)
class Source:
    """An input, as the user named it (`path`), the file it is (`real`, its resolved path), and what shows
    that it changed: a file's size, and a local shard's modification time.

    A remote shard (a webdataset URL such as `https://host/0001.tar` or `pipe:aws s3 cp s3://b/0001.tar -`)
    is known by its URL alone, exactly as given: two spellings of one URL are two sources.
    """

    path: str
    real: str
    size: int | None = None
    mtime_ns: int | None = None

    @property
    def is_shard(self) -> bool:
        return is_shard(self.path)

    def identity(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    @staticmethod
    def from_identity(identity: dict) -> 'Source':
        return Source(**identity)


def is_url(path: str) -> bool:
    """A webdataset URL, read through webdataset's opener (`pipe:COMMAND`, `http(s)://`, ...)."""
    return path.startswith('pipe:') or '://' in path


def is_shard(path: str) -> bool:
    return is_url(path) or path.lower().endswith(SHARD_SUFFIXES)


def _source(path: str, stat: os.stat_result, real: str | None = None) -> Source:
    if not S_ISREG(stat.st_mode):  # a pipe or a device would block or never end
        raise OSError(errno.EINVAL, 'not a regular file')
    return Source(path, real or os.path.realpath(path), stat.st_size, stat.st_mtime_ns if is_shard(path) else None)


def _input_problem(path: str, error: OSError, named_by: str) -> InputError:
    what = 'no such file' if isinstance(error, FileNotFoundError) else error.strerror or str(error)
    return InputError(f'{path}: {what}{named_by}')


def _walk(folder: str, named_by: str, ancestors: frozenset[str] = frozenset()) -> Iterator[Source]:
    """Image files and shards under `folder`, in the order of their full path strings.

    A folder reached again inside itself (a symbolic link to an ancestor) is not walked again.
    """
    real = os.path.realpath(folder)
    if real in ancestors:
        return
    entries = []
    try:
        with os.scandir(folder) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                except OSError:  # a link loop: a file as far as the walk goes, named if it is an image's
                    is_dir = False
                entries.append((entry.name + ('/' if is_dir else ''), entry, is_dir))
    except OSError as e:
        raise _input_problem(folder, e, named_by) from None
    for _, entry, is_dir in sorted(entries, key=lambda e: e[0]):
        if is_dir:
            yield from _walk(entry.path, named_by, ancestors | {real})
        elif Path(entry.name).suffix.lower() in IMAGE_SUFFIXES or is_shard(entry.name):
            try:  # the resolved path without a system call per file, unless the entry is a link
                yield _source(entry.path, entry.stat(), None if entry.is_symlink() else os.path.join(real, entry.name))
            except OSError as e:  # a dangling link, a link loop
                raise _input_problem(entry.path, e, named_by) from None


def expand_pattern(pattern: str) -> list[str]:
    """Paths a brace pattern (`data/{00000..00099}.tar`) and/or glob names, in the pattern's order."""
    found: list[str] = []
    for expanded in braceexpand(pattern):
        found.extend(sorted(glob.glob(expanded)) if set(expanded) & set('*?[') else [expanded])
    return found


def _stat(path: str, named_by: str) -> Source:
    try:
        return _source(path, os.stat(path))
    except OSError as e:
        raise _input_problem(path, e, named_by) from None


def _folder(path: str) -> Iterator[Source]:
    found = False
    for source in _walk(path, f' (in the input folder {path})'):
        found = True
        yield source
    if not found:
        raise InputError(f'{path}: the folder holds no image file ({", ".join(sorted(IMAGE_SUFFIXES))}) '
                         f'and no shard ({", ".join(SHARD_SUFFIXES)})')


def _listed(files_from: str) -> Iterator[Source]:
    """The files of a --files-from list: one path per line, in any bytes (a final \\r is dropped)."""
    try:
        with open(files_from, 'rb') as f:
            lines = f.read().split(b'\n')
    except OSError as e:
        raise InputError(f'--files-from {files_from}: {e.strerror or e}') from None
    for number, line in enumerate(lines, 1):
        path = os.fsdecode(line[:-1] if line.endswith(b'\r') else line)
        if os.path.isdir(path):
            yield from _folder(path)
        elif path.strip():
            yield _stat(path, f' (line {number} of --files-from {files_from})')


def input_sources(inputs: Sequence[str], files_from: str | None) -> Iterator[Source]:
    """Every input file (tar shards and image files), in the order given; raises InputError for a missing one.

    Folders are walked for image files and shards; a problem inside one (an unreadable subfolder, a
    dangling link) is an InputError naming the path and the input folder. A source may come more than
    once (see `unique_sources`).
    """
    for arg in inputs:
        if is_url(arg):
            yield from (Source(url, url) for url in braceexpand(arg))
        elif os.path.isdir(arg):
            yield from _folder(arg)
        elif os.path.isfile(arg):
            yield _stat(arg, '')
        elif set(arg) & _PATTERN_CHARS:
            matches = expand_pattern(arg)
            if not matches:
                raise InputError(f'{arg}: matches no file')
            for match in matches:
                yield from _folder(match) if os.path.isdir(match) else [_stat(match, f' (from {arg})')]
        elif os.path.lexists(arg):
            yield _stat(arg, '')  # a dangling link or a link loop: its own error
        else:
            raise InputError(f'{arg}: no such file or folder')
    if files_from:
        yield from _listed(files_from)


@dataclass
class Duplicates:
    """Sources reached more than once (by their resolved path, or the same URL), each embedded once."""

    count: int = 0
    example: tuple[str, str] | None = None  # (the first spelling, a later one)

    def note(self) -> str | None:
        if not self.count:
            return None
        first, again = self.example
        return (f'note: {self.count} input file(s) reached more than once are embedded once (e.g. {again} is '
                f'{first})')


def unique_sources(sources: Iterable[Source]) -> tuple[list[Source], Duplicates]:
    """The sources in order, each file or URL once (its first spelling kept), and what was dropped."""
    seen: dict[str, str] = {}
    kept, duplicates = [], Duplicates()
    for source in sources:
        if source.real in seen:
            duplicates.count += 1
            duplicates.example = duplicates.example or (seen[source.real], source.path)
            continue
        seen[source.real] = source.path
        kept.append(source)
    return kept, duplicates


@dataclass
class Sample:
    key: str  # the file's path, or the webdataset __key__
    image: Any  # a path or the image file's bytes
    caption: Any = None  # bytes or str, when captions are read
    meta: dict | None = None


@dataclass(frozen=True)
class Skip:
    """A sample that gives no row: its key (None when unknown), a reason code and a detail for people.

    Codes: `no_image`, `bad_json`, `no_caption`, `caption_not_text`, `undecodable_image`, `image_too_large`
    (see `PixelLimits`), `unsupported_pixels`, `member_too_large`, `damaged_tar`, and UNREADABLE
    (`unreadable_shard`: the shard itself could not be read; its unit is not marked done).
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
    except Exception as e:  # whatever else a damaged archive makes tarfile raise: damage, not a stop
        damage = Skip(None, 'damaged_tar', f'unreadable ({type(e).__name__}: {str(e)[:200]})')
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
        if info.size > MAX_MEMBER_BYTES:  # not read: the stream skips over it
            archive.members = []
            last = info.name
            yield key, extension.lower(), TOO_LARGE
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
    too_large = next((ext for ext, data in raw.items() if data is TOO_LARGE), None)
    if too_large is not None:
        return Skip(key, 'member_too_large', f'its {too_large} member is over {MAX_MEMBER_BYTES >> 20} MB')
    meta = None
    if 'json' in raw:
        try:
            meta = json.loads(raw['json'])
            if not isinstance(meta, dict):
                return Skip(key, 'bad_json', 'not a JSON object')
            meta = metadata.sample_fields(meta)
        except (ValueError, RecursionError) as e:  # RecursionError: nested too deep for the parser
            return Skip(key, 'bad_json', str(e)[:80] or type(e).__name__)
    return Sample(key, image, raw.get(caption_key) if caption_key else None, meta)


def unit_samples(shard: str | None, files: Sequence[str], image_keys: Sequence[str] = IMAGE_KEYS,
                 caption_key: str | None = None) -> Iterator[Sample | Skip]:
    """The samples of a shard, or of image files (which have no captions), in order."""
    if shard is None:
        yield from (Sample(path, path) for path in files)
    else:
        yield from _tar_samples(shard, image_keys, caption_key)


@dataclass(frozen=True)
class PixelLimits:
    """The most pixels an image may have decoded (`decoded`), and once its short side is resized to `side`
    (`resized`, as the model's transform does); a larger image is an `image_too_large` skip, found from
    its header before its pixels are decoded. The default for `decoded` is PIL's own guard against
    decompression bombs (which only warns below twice that); `resized` allows an aspect ratio of about
    330:1 at 224 px (a 1x10000 strip would resize to 224x2240000).
    """

    decoded: int = MAX_IMAGE_PIXELS
    resized: int = MAX_RESIZED_PIXELS
    side: int = 224

    def check(self, width: int, height: int) -> None:
        if width * height > self.decoded:
            raise ImageRefused('image_too_large', f'{width}x{height} pixels, over --max-image-pixels {self.decoded}')
        short, long = sorted((width, height))
        if short and self.side * round(self.side * long / short) > self.resized:
            raise ImageRefused('image_too_large', f'{width}x{height} resizes to {self.side}x'
                                                  f'{round(self.side * long / short)}, over --max-resized-pixels {self.resized}')


class ImageRefused(ValueError):
    """An image that is not decoded, with a skip reason code."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


_16_BIT = ('I;16', 'I;16L', 'I;16B', 'I;16N')


def _eight_bit(image: Image.Image) -> Image.Image:
    """The image with 8-bit channels: 16-bit greyscale reduced by its high byte (v >> 8), as PIL itself
    reduces 16-bit RGB; `convert('RGB')`, the model's transform's first step, would clip it to white."""
    if image.mode not in _16_BIT + ('I', 'F'):
        return image.copy()
    if image.mode == 'F':
        raise ImageRefused('unsupported_pixels', 'floating-point pixels (PIL mode F)')
    values = np.asarray(image)
    if image.mode == 'I' and (values.min() < 0 or values.max() > 65535):
        raise ImageRefused('unsupported_pixels', '32-bit integer pixels beyond 16 bits (PIL mode I)')
    return Image.fromarray((values >> 8).astype(np.uint8))


def open_image(source: Any, limits: PixelLimits | None = None) -> Image.Image:
    """The decoded image of a path or of an image file's bytes, with 8-bit channels (raises on failure).

    With `limits`, an image over them raises `ImageRefused` before its pixels are decoded (and PIL's
    own decompression-bomb guard, which they replace, is off).
    """
    saved = Image.MAX_IMAGE_PIXELS
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', Image.DecompressionBombWarning)
        if limits is not None:
            Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
                if limits is not None:
                    limits.check(*image.size)
                image.load()
                return _eight_bit(image)
        finally:
            Image.MAX_IMAGE_PIXELS = saved


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
