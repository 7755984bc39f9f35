"""Reading checkpoint files through a read-only memory map, and dropping pages once they are copied.

`torch.load(path, mmap=True)` maps the file private and writable. The kernel counts such a mapping
against the memory it can promise, so under the usual heuristic overcommit a checkpoint larger than
RAM cannot be mapped at all (EVA-CLIP-8B: 32.9 GB on a 24 GB machine fails at once with "Cannot
allocate memory"). A read-only mapping has no such cost and can never write to the file, which may be
read-only or a blob shared by a hub cache. So the two formats this package loads are read here from
one `PROT_READ` mapping:

- PyTorch's zip format (what `torch.save` writes): `data.pkl` is unpickled with torch's own
  weights-only unpickler, and each storage it names is a view of its record in the mapping (records are
  stored uncompressed);
- safetensors: its JSON header gives every tensor's dtype, shape and byte range.

Tensors read this way must only be read (the memory is read-only). `release` drops a copied tensor's
pages from the process; the file's page cache is left to the kernel.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import io
import json
import mmap
import os
import pickle
import pickletools
import struct
import sys
import warnings
import zipfile
import zlib
from typing import Any, BinaryIO

import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True) if sys.platform.startswith('linux') else None
_SAFETENSORS_DTYPES = {
    'F64': torch.float64, 'F32': torch.float32, 'F16': torch.float16, 'BF16': torch.bfloat16,
    'I64': torch.int64, 'I32': torch.int32, 'I16': torch.int16, 'I8': torch.int8, 'U8': torch.uint8,
    'BOOL': torch.bool,
}


class UnsafePickle(pickle.UnpicklingError):
    """The pickle names Python objects other than tensors (it could run code); nothing was executed."""


def _map(path: str | os.PathLike) -> mmap.mmap:
    with open(path, 'rb') as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)


def _view(mapped: mmap.mmap, start: int, nbytes: int) -> torch.Tensor:
    """Bytes [start, start + nbytes) of the mapping as a uint8 tensor, without copying."""
    if start + nbytes > len(mapped):
        raise EOFError(f'a tensor ends at byte {start + nbytes}, past the end of the file ({len(mapped)})')
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():  # torch warns that the buffer is read-only; it is only read
        warnings.simplefilter('ignore', UserWarning)
        return torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=start)


def _record_offset(mapped: mmap.mmap, info: zipfile.ZipInfo) -> int:
    """Where the data of a stored zip record starts (after its local header)."""
    if info.compress_type != zipfile.ZIP_STORED:
        raise ValueError(f'record {info.filename} is compressed')
    header = mapped[info.header_offset:info.header_offset + 30]
    if len(header) < 30 or header[:4] != b'PK\x03\x04':
        raise ValueError(f'bad local header for record {info.filename}')
    name_len, extra_len = struct.unpack('<HH', header[26:30])
    return info.header_offset + 30 + name_len + extra_len


class CorruptRecord(ValueError):
    """A record whose stored CRC-32 does not match its data."""


def _pickle_record(mapped: mmap.mmap, records: dict[str, zipfile.ZipInfo]) -> bytes:
    """The bytes of `data.pkl`, checked against its CRC-32 where the file has one.

    Read from the mapping rather than through `zipfile`, which refuses the files `torch.save` writes
    with checksums turned off (`torch.serialization.set_crc32_options(False)`: every CRC is 0), as
    `torch.load` reads them. Records are found through the central directory, so data descriptors,
    zip64 and torch's alignment padding need nothing more; the folder name in front of each record
    (the file's stem, or `archive/` in older files) is ignored.
    """
    info = records.get('data.pkl')
    if info is None:
        raise ValueError('no data.pkl record')
    start = _record_offset(mapped, info)
    data = mapped[start:start + info.file_size]
    if len(data) != info.file_size:
        raise EOFError(f'record {info.filename} ends past the end of the file')
    if info.CRC and zlib.crc32(data) != info.CRC:
        raise CorruptRecord(f'record {info.filename} is corrupted (its CRC-32 does not match its data)')
    return data


def read_torch_zip(path: str | os.PathLike, weights_only: bool = True) -> Any:
    """Unpickle a `torch.save` zip file with every storage a read-only view of the mapped file.

    Raises `UnsafePickle` when `weights_only` and the pickle names anything but tensors and containers.
    """
    mapped = _map(path)
    with zipfile.ZipFile(path) as archive:
        records = {info.filename.split('/', 1)[-1]: info for info in archive.infolist()}
    data = _pickle_record(mapped, records)
    storages: dict[str, torch.storage.TypedStorage] = {}

    def persistent_load(saved_id: tuple) -> torch.storage.TypedStorage:
        _, storage_type, key, _location, numel = saved_id
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        if key not in storages:
            info = records[f'data/{key}']
            nbytes = numel * torch.tensor([], dtype=dtype).element_size()
            view = _view(mapped, _record_offset(mapped, info), nbytes)
            storages[key] = torch.storage.TypedStorage(wrap_storage=view.untyped_storage(), dtype=dtype,
                                                       _internal=True)
        return storages[key]

    if weights_only:
        from torch._weights_only_unpickler import Unpickler
    else:
        Unpickler = pickle.Unpickler
    unpickler = Unpickler(io.BytesIO(data), encoding='utf-8')
    unpickler.persistent_load = persistent_load
    try:
        with warnings.catch_warnings():  # torch < 2.2 warns that TypedStorage, its own rebuild format, is deprecated
            warnings.filterwarnings('ignore', 'TypedStorage is deprecated')
            return unpickler.load()
    except (pickle.UnpicklingError, RuntimeError) as e:  # torch < 2.4 raises RuntimeError
        if weights_only and whole_pickles(io.BytesIO(data), 1):  # whole, so refused for what it names
            raise UnsafePickle(str(e)) from None
        raise


LEGACY_PICKLES = 4  # a legacy torch.save file: magic number, protocol, system info, then the state dict


def whole_pickles(stream: BinaryIO, count: int) -> bool:
    """Whether `stream` begins with `count` whole pickles: their opcodes read to each STOP (nothing is executed).

    A pickle that is whole but that the weights-only unpickler refuses names objects it does not allow."""
    try:
        for _ in range(count):
            for _opcode in pickletools.genops(stream):
                pass
        return True
    except Exception:  # any damage: an unknown opcode, data cut short
        return False


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file, each a read-only view of the mapped file."""
    mapped = _map(path)
    if len(mapped) < 8:
        raise ValueError('too short for a safetensors header')
    (size,) = struct.unpack('<Q', mapped[:8])
    if 8 + size > len(mapped):
        raise ValueError('header runs past the end of the file')
    header = json.loads(mapped[8:8 + size])
    base = 8 + size
    tensors = {}
    for key, entry in header.items():
        if key == '__metadata__':
            continue
        dtype = _SAFETENSORS_DTYPES[entry['dtype']]
        start, end = entry['data_offsets']
        view = _view(mapped, base + start, end - start)
        tensors[key] = view.view(dtype).reshape(entry['shape'])
    return tensors


def release(tensor: torch.Tensor) -> None:
    """Drop the resident whole pages of a tensor read from a mapped checkpoint (Linux only).

    The mapping is read-only and backed by the file, so a later read of the tensor reads the file
    again: this never changes what the tensor holds.
    """
    if _libc is None or tensor.device.type != 'cpu':
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours keep theirs
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
