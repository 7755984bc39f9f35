"""Dropping the pages of a memory-mapped checkpoint tensor once it has been copied.

`torch.load(..., mmap=True)` maps the checkpoint file privately and read-only. Pages of it count
towards the process's resident memory once touched, until the whole mapping goes away, so loading a
2.2 GB fp16 file into a 4.5 GB fp32 model would otherwise peak at both. `madvise(MADV_DONTNEED)`
on an unmodified private file mapping only drops the process's copy of those pages: a later access
reads them from the file again, so this never changes what a tensor holds.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys

import torch

_MADV_DONTNEED = 4
_libc = ctypes.CDLL(ctypes.util.find_library('c'), use_errno=True) if sys.platform.startswith('linux') else None


def release(tensor: torch.Tensor) -> None:
    """Drop the resident whole pages of a tensor that lives in a read-only file mapping (Linux only).

    Only call this for tensors of a checkpoint loaded with `torch.load(mmap=True)`.
    """
    if _libc is None or tensor.device.type != 'cpu':
        return
    storage = tensor.untyped_storage()
    start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
    first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE  # whole pages only: neighbours keep theirs
    last = end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), _MADV_DONTNEED)
