"""Freed host memory stays in the process: a cold batch's fresh buffers are not faulted in again."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

# Cold batches as the runtime fuses them on a CPU (64 units profiles of MiniLM's shape, over a
# bank of 200 adapters, copied into a pool), counting the page faults each batch takes.
PROBE = """
import json, resource, sys
import torch
torch.set_num_threads(2)
if sys.argv[1] == "retain":
    from xpeft.engine.host_memory import retain_freed_memory
    assert retain_freed_memory()
from xpeft.adapters.fusion import UnitTable, fuse_units
L, P, d, r, U, k = 6, 4800, 384, 24, 64, 96
g = torch.Generator().manual_seed(0)
table = UnitTable(
    torch.randn(L * P, d, generator=g), torch.randn(L * P, generator=g), torch.randn(L * P, d, generator=g), L, r
)
pool = [torch.zeros(L, U, d, r), torch.zeros(L, U, r), torch.zeros(L, U, r, d), torch.zeros(L, U, d)]
def batch(seed):
    g = torch.Generator().manual_seed(seed)
    index = torch.sort(torch.rand(U, 2, L, P, generator=g).argsort(-1)[..., :k], -1).values
    fused = fuse_units(index[:, 0], index[:, 1], torch.full((U,), 0.5), torch.full((U, L), 0.1), None, table)
    for t, new in zip(pool, fused.tensors()):
        t.index_copy_(1, torch.arange(U), new)
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for s in range(3):
    batch(s)
before = faults()
for s in range(10):
    batch(s)
print(json.dumps({"faults_per_batch": (faults() - before) / 10}))
"""


def _faults(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=300, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["faults_per_batch"])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_retained_memory_spares_a_cold_batch_its_page_faults():
    default, retained = _faults("default"), _faults("retain")
    # by default glibc hands the fused tensors back to the kernel and faults them in again
    assert default > 2000, (default, retained)
    assert retained < 200, (default, retained)  # retained, they come back from the heap, mapped
