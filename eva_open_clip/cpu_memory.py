"""Freed memory on the CPU (glibc): returned while a model is quantized as it loads and while it trains, reused
during inference.

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

Training on the CPU wants the same in steady state (`return_large_blocks`): its activations, gathered FSDP blocks
and gradients are freed every step, and with glibc's threshold raised to 32 MB by the first of them, the freed
blocks below it stay with the process. EVA02-CLIP-B-16 on two processes, batch 4: DDP held 4.07 GB over its imports
and FSDP 3.84 GB; with blocks of 128 kB and more mapped and unmapped, 3.47 GB and 2.09 GB (the plan: 3.59, 1.79).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
LARGE_BLOCK = 128 * 1024  # glibc's own initial mmap threshold


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


def return_large_blocks() -> bool:
    """Make glibc map each block of LARGE_BLOCK bytes or more on its own and unmap it when freed, for good (its
    dynamic threshold off); False where that is not possible."""
    libc = _libc()
    if libc is None or not hasattr(libc, 'mallopt'):  # not glibc
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, LARGE_BLOCK))
