"""Which Triton kernels may run: the names, the measured defaults and the ``XPEFT_KERNELS`` grammar.

Apart from :mod:`xpeft.adapters.kernels` (which needs torch) so that the server's settings can
check a value at start-up without loading torch.
"""

from __future__ import annotations

__all__ = ["KERNELS", "MEASURED_FASTER", "describe", "parse_policy"]

KERNELS = ("apply", "gather")

#: Kernels on by default on CUDA: each measured faster than the torch path it replaces on an H200
#: (bench/gpu_check.py, bf16, BERT-base shapes; bench/results/cuda.json, docs/BENCHMARKS.md):
#: ``apply`` 2.5-4.8x per layer at 1-256 distinct profiles, ``gather`` at every (N, U) timed, and
#: without the torch gather's (U, L, k, d, r) copy. Whether to gather or to GEMM is the caller's
#: choice: the GEMM was faster from U=64 profiles per fusion on.
MEASURED_FASTER: dict[str, bool] = {"apply": True, "gather": True}


def parse_policy(raw: str) -> dict[str, bool]:
    """The kernels an ``XPEFT_KERNELS`` value turns on: ``off``, ``all``, ``auto`` or a comma list."""
    raw = raw.strip().lower()
    if raw in ("", "auto", "default"):
        return dict(MEASURED_FASTER)
    if raw in ("off", "none", "0", "false", "torch"):
        return dict.fromkeys(KERNELS, False)
    if raw in ("all", "on", "1", "true", "triton"):
        return dict.fromkeys(KERNELS, True)
    chosen = {name.strip() for name in raw.split(",") if name.strip()}
    unknown = chosen - set(KERNELS)
    if unknown:
        raise ValueError(f"XPEFT_KERNELS names unknown kernels {sorted(unknown)}; known: {KERNELS}")
    return {name: name in chosen for name in KERNELS}


def describe(policy: dict[str, bool]) -> str:
    """``policy`` as the comma list of the kernels it turns on (``none`` when it turns on none)."""
    return ",".join(name for name in KERNELS if policy.get(name)) or "none"
