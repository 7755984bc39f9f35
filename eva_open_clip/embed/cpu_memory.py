"""Reusing freed memory during CPU inference (glibc).

glibc serves allocations above its mmap threshold (32 MB at most) with fresh mappings and unmaps them
when they are freed, and torch's CPU allocator does not cache, so every forward of a large model
page-faults all of its big activations again: about 6% of a g/14 image forward on 2 cores. With those
mappings disabled and trimming raised, freed blocks are reused instead. The command-line tools apply
this once the model is loaded (so loading still returns its scratch memory); it changes memory reuse,
never results. Library users get the same with `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647`
in the environment, or by preloading jemalloc or tcmalloc.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc keep and reuse freed blocks in this process; False where that is not possible."""
    if not sys.platform.startswith('linux'):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library('c'))
        return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1))
    except (OSError, AttributeError):  # not glibc
        return False
