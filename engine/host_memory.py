"""Keep freed host memory in the serving process, so that each batch's buffers are not faulted in again.

A cold batch on a CPU fuses its profiles' adapters into fresh tensors of some megabytes each
(``embedding_bag`` has no output argument). Whether glibc's malloc gives such blocks back to the
kernel when they are freed depends on the process's history: it starts by serving them with an
``mmap`` each, unmapped on free, and raises that threshold only after freeing a large mapped block;
it also trims its heap's top once the free space there passes twice that threshold. Where it gives
them back, the next batch takes a page fault for every 4 KiB it writes. Two ``mallopt`` settings
make the behaviour fixed instead: blocks up to the largest mmap threshold glibc accepts come from the
heap, and the heap is not trimmed below a gigabyte of free space. The resident size then stays at
its peak, as with an arena allocator.
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
