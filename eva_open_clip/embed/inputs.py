"""What `embed` is given: image files, folders, `--files-from` lists, tar shards, globs and brace patterns.

`input_sources` lists the inputs in the order given (folders walked in path order for image files and
shards, `--files-from` read line by line), each with its resolved path and the identity that shows a
later change: size and modification time of a tar shard, size of an image file. A missing input, or a
problem inside an input folder, is an `InputError` naming it, before any work. `unique_sources` keeps
each file (by resolved path) or URL once.
"""
from __future__ import annotations

import errno
import functools
import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISREG
from typing import Iterable, Iterator, Sequence

from braceexpand import braceexpand

from eva_open_clip.embed.remote import is_url, url_identity
from eva_open_clip.errors import UsageError, param

SHARD_SUFFIXES = ('.tar', '.tar.gz', '.tgz')
COMMON_SUFFIXES = ('.bmp', '.gif', '.jpeg', '.jpg', '.png', '.tif', '.tiff', '.webp')  # named in messages


@functools.lru_cache(maxsize=None)
def image_suffixes() -> frozenset[str]:
    """The file name extensions of the image formats this environment's Pillow opens and decodes (its stubs,
    which only identify a format, such as HDF5 and GRIB, left out); a plugin registered with Pillow before
    the walk (pillow-heif for .heic, say) adds its own."""
    from PIL import Image, ImageFile
    Image.init()

    def stub(opener) -> bool:  # an opener is a class, or a factory function (JPEG's)
        return isinstance(opener, type) and issubclass(opener, ImageFile.StubImageFile)

    return frozenset(suffix for suffix, kind in Image.registered_extensions().items()
                     if kind in Image.OPEN and not stub(Image.OPEN[kind][0]))


@dataclass
class PassedOver:
    """Files in input folders that a walk passes over (neither an image this Pillow opens nor a shard), counted
    by extension."""

    by_suffix: dict[str, int] = field(default_factory=dict)

    def add(self, name: str) -> None:
        suffix = Path(name).suffix.lower() or '(no extension)'
        self.by_suffix[suffix] = self.by_suffix.get(suffix, 0) + 1

    def note(self) -> str | None:
        if not self.by_suffix:
            return None
        counts = ', '.join(f'{s} {n}' for s, n in sorted(self.by_suffix.items(), key=lambda i: (-i[1], i[0])))
        return (f'note: passed over {sum(self.by_suffix.values())} file(s) in the input folders that are neither '
                f'images this Pillow opens nor shards ({counts})')


class InputError(UsageError):
    """An input argument that names nothing readable."""


@dataclass(frozen=True)
class Source:
    """An input, as the user named it (`path`), the file it is (`real`, its resolved path), and what shows
    that it changed: a file's size, and a local shard's modification time.

    A remote shard (a URL such as `https://host/0001.tar` or `pipe:aws s3 cp s3://b/0001.tar -`) is known by
    its URL as given, less the query parameters that sign or date it (`remote.url_identity`): two spellings
    of one URL are two sources, two signatures of one are one.
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


def is_shard(path: str) -> bool:
    return is_url(path) or path.lower().endswith(SHARD_SUFFIXES)


def _source(path: str, stat: os.stat_result, real: str | None = None) -> Source:
    if not S_ISREG(stat.st_mode):  # a pipe or a device would block or never end
        raise OSError(errno.EINVAL, 'not a regular file')
    return Source(path, real or os.path.realpath(path), stat.st_size, stat.st_mtime_ns if is_shard(path) else None)


def _input_problem(path: str, error: OSError, named_by: str) -> InputError:
    what = 'no such file' if isinstance(error, FileNotFoundError) else error.strerror or str(error)
    return InputError(f'{path}: {what}{named_by}')


def _walk(folder: str, named_by: str, passed: PassedOver, ancestors: frozenset[str] = frozenset()) -> Iterator[Source]:
    """Image files and shards under `folder`, in the order of their full path strings; the other files are counted
    in `passed`.

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
            yield from _walk(entry.path, named_by, passed, ancestors | {real})
        elif Path(entry.name).suffix.lower() in image_suffixes() or is_shard(entry.name):
            try:  # the resolved path without a system call per file, unless the entry is a link
                yield _source(entry.path, entry.stat(), None if entry.is_symlink() else os.path.join(real, entry.name))
            except OSError as e:  # a dangling link, a link loop
                raise _input_problem(entry.path, e, named_by) from None
        else:
            passed.add(entry.name)


def expand_pattern(pattern: str) -> list[str]:
    """Paths a brace pattern (`data/{00000..00099}.tar`) and/or glob names, in the pattern's order."""
    found: list[str] = []
    for expanded in braceexpand(pattern):
        found.extend(sorted(glob.glob(expanded)) if glob.has_magic(expanded) else [expanded])
    return found


def _stat(path: str, named_by: str) -> Source:
    try:
        return _source(path, os.stat(path))
    except OSError as e:
        raise _input_problem(path, e, named_by) from None


def _folder(path: str, passed: PassedOver) -> Iterator[Source]:
    found = False
    for source in _walk(path, f' (in the input folder {path})', passed):
        found = True
        yield source
    if not found:
        common = ', '.join(s for s in COMMON_SUFFIXES if s in image_suffixes())
        raise InputError(f'{path}: the folder holds no image file ({common} and the other formats this Pillow '
                         f'opens) and no shard ({", ".join(SHARD_SUFFIXES)})')


def _files_from(files_from: str, passed: PassedOver) -> Iterator[Source]:
    """The files of a --files-from list: one path per line, in any bytes (a final \r is dropped), or, where the
    list holds a NUL byte (`find -print0`), one path per NUL-ended entry, every byte of it kept."""
    try:
        with open(files_from, 'rb') as f:
            data = f.read()
    except OSError as e:
        raise InputError(f"{param('files_from', files_from)}: {e.strerror or e}") from None
    nul = b'\0' in data
    for number, entry in enumerate(data.split(b'\0' if nul else b'\n'), 1):
        path = os.fsdecode(entry if nul or not entry.endswith(b'\r') else entry[:-1])
        if os.path.isdir(path):
            yield from _folder(path, passed)
        elif path if nul else path.strip():
            yield _stat(path, f" ({'entry' if nul else 'line'} {number} of {param('files_from', files_from)})")


def input_sources(inputs: Sequence[str], files_from: str | None,
                  passed: PassedOver | None = None) -> Iterator[Source]:
    """Every input file (tar shards and image files), in the order given; raises InputError for a missing one.

    Folders are walked for image files and shards (the other files they hold are counted in `passed`); a
    problem inside one (an unreadable subfolder, a dangling link) is an InputError naming the path and the
    input folder. A source may come more than once (see `unique_sources`).
    """
    passed = passed if passed is not None else PassedOver()
    for arg in inputs:
        if is_url(arg):
            yield from (Source(url, url_identity(url)) for url in braceexpand(arg))
        elif os.path.isdir(arg):
            yield from _folder(arg, passed)
        elif os.path.isfile(arg):
            yield _stat(arg, '')
        elif glob.has_magic(arg) or '{' in arg:  # a glob, or a brace pattern
            matches = expand_pattern(arg)
            if not matches:
                raise InputError(f'{arg}: matches no file')
            for match in matches:
                yield from _folder(match, passed) if os.path.isdir(match) else [_stat(match, f' (from {arg})')]
        elif os.path.lexists(arg):
            yield _stat(arg, '')  # a dangling link or a link loop: its own error
        else:
            raise InputError(f'{arg}: no such file or folder')
    if files_from:
        yield from _files_from(files_from, passed)


def named_identities(arg: str) -> list[str]:
    """What an argument names (its brace patterns expanded) as sources are known: a URL less the parameters that
    sign it, a path resolved (whether or not the file is there)."""
    return [url_identity(a) if is_url(a) else os.path.realpath(a) for a in braceexpand(arg)]


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


@dataclass
class Listing:
    """What listing the inputs passed by: the duplicates dropped and the files in folders passed over."""

    duplicates: Duplicates
    passed: PassedOver

    def notes(self) -> list[str]:
        return [note for note in (self.duplicates.note(), self.passed.note()) if note]


def list_sources(inputs: Sequence[str], files_from: str | None) -> tuple[list[Source], Listing]:
    """The sources of the inputs, each once, in order (`input_sources`, `unique_sources`), and what was passed by."""
    passed = PassedOver()
    sources, duplicates = unique_sources(input_sources(inputs, files_from, passed))
    return sources, Listing(duplicates, passed)


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
