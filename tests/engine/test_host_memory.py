"""Freed host memory stays in the process: a batch's fresh buffers are not faulted in again.

glibc serves a fresh process's large blocks by ``mmap`` and unmaps them when they are freed, so
the next batch's buffers are new pages, each faulted in as it is first written. Retained, blocks
of up to 32 MiB come from the heap and stay mapped once freed.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Three 20 MiB tensors (a cold batch fuses tensors of this order), written, then freed.
PROBE = """
import json, sys
import torch
torch.set_num_threads(1)
if sys.argv[1] == "retain":
    from xpeft.engine.host_memory import retain_freed_memory
    assert retain_freed_memory()
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * 4096
def heap():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            low, high = line.split()[0].split("-")
            return int(low, 16), int(high, 16)
    return 0, 0
base = resident()
blocks = [torch.empty(20 * 2**20 // 4).fill_(1.0) for _ in range(3)]
peak = resident()
low, high = heap()
on_heap = all(low <= b.data_ptr() < high for b in blocks)
del blocks
print(json.dumps({"kept": (resident() - base) / (peak - base), "on_heap": on_heap}))
"""


def _probe(mode: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_blocks_come_from_the_heap_and_stay_mapped_once_freed():
    default, retained = _probe("default"), _probe("retain")
    assert not default["on_heap"] and default["kept"] < 0.2, default  # unmapped on free
    assert retained["on_heap"] and retained["kept"] > 0.8, retained  # still resident, reused
