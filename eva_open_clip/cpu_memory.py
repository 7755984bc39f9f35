"""Freed memory on the CPU (glibc): returned while a model is quantized as it loads, reused during inference.

glibc serves allocations above its mmap threshold (32 MB at most) with fresh mappings and unmaps them
when they are freed, and torch's CPU allocator does not cache, so every forward of a large model
page-faults all of its big activations again: about 6% of a g/14 image forward on 2 cores. With those
mappings disabled and trimming raised, freed blocks are reused instead. The command-line tools apply
this once the model is loaded (so loading still returns its scratch memory); it changes memory reuse,
never results. Library users get the same with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`
in the environment, or by preloading jemalloc or tcmalloc.

While a model is quantized as it loads, the opposite is wanted: each matrix's full-precision scratch
(tens of MB, below the threshold glibc has raised itself to by then) is freed between the int8 matrices
that stay, and glibc keeps those holes: g/14 in int8 peaked at 1.66x its int8 bytes so. `return_freed`
hands them back after each matrix (1.08x).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


@functools.lru_cache(maxsize=None)
def _libc() -> ctypes.CDLL | None:
    """The C library, once (finding it runs ldconfig); None off Linux."""
    if not sys.platform.startswith('linux'):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library('c'))
    except OSError:
        return None


def return_freed() -> None:
    """Give the memory glibc holds free back to the system (`malloc_trim`); nothing where that is not glibc."""
    libc = _libc()
    if libc is not None and hasattr(libc, 'malloc_trim'):
        libc.malloc_trim(0)


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed blocks in this process; False where that is not possible."""
    libc = _libc()
    if libc is None or not hasattr(libc, 'mallopt'):  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
