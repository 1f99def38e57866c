"""Keep freed host memory in the serving process, so that each batch's buffers are not faulted in again.

A cold batch on a CPU fuses its profiles' adapters into fresh tensors of some megabytes each
(``embedding_bag`` has no output argument). glibc's malloc returns such blocks to the kernel when
they are freed (an ``mmap`` per block, or a trim of the heap's top), so the next batch takes a page
fault for every 4 KiB it writes: thousands per batch, which cost more than the gather itself on a
virtual machine (docs/BENCHMARKS.md, Encoder backends). Two ``mallopt`` settings keep them: blocks
up to the largest fixed mmap threshold come from the heap, and the heap is not trimmed below a
gigabyte of free space. The resident size then stays at its peak, as with an arena allocator.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

__all__ = ["MMAP_THRESHOLD", "TRIM_THRESHOLD", "retain_freed_memory"]

log = logging.getLogger("xpeft.engine")

# glibc's malloc.h
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # the largest glibc accepts on a 64-bit machine; setting it stops its drift
TRIM_THRESHOLD = 1024 * 1024 * 1024  # free space the heap keeps before it gives memory back


def retain_freed_memory() -> bool:
    """Set both thresholds for the whole process (glibc only); whether they took effect."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    )
    if done:
        log.info("host memory: freed blocks of up to %d MiB stay in the process", MMAP_THRESHOLD >> 20)
    return done
